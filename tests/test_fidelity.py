"""Teacher-forced drift: the full answer scored under the reduced model, checked against direct sums."""

import torch
from conftest import photo

from explorer import load_image, run
from explorer.engine.fidelity import drift, logprobs

PROMPT = "What is in the picture?"


def test_the_full_models_log_probabilities_equal_a_direct_forward_pass(backend):
    image = photo(400, 300)
    full = run(backend, image, PROMPT, "none", max_new_tokens=8)
    prepared = backend.prepare(load_image(image), PROMPT)  # stock processor inputs, every visual token
    answer = torch.tensor([full.answer_ids])
    inputs = dict(prepared.inputs)
    length = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], 1)
    with torch.inference_mode():
        direct = backend.model(**inputs).logits[0, length - 1 : length - 1 + answer.shape[1]].log_softmax(-1)
    ours = logprobs(backend, image, PROMPT, full.answer_ids)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-5)
    assert ours.argmax(-1).tolist() == list(full.answer_ids)  # greedy decoding chose exactly these


def test_no_reduction_has_no_drift_and_a_few_tokens_have_some(backend):
    image = photo(400, 300, seed=3)
    full = run(backend, image, PROMPT, "none", max_new_tokens=8)
    theirs = logprobs(backend, image, PROMPT, full.answer_ids)
    same = drift(logprobs(backend, image, PROMPT, full.answer_ids, "cls", 1.0), theirs, full.answer_ids)
    assert same["logprob"] == same["full_logprob"] and same["logprob_diff"] == 0
    assert same["kl"] == 0 and same["first_divergence"] is None

    mine = logprobs(backend, image, PROMPT, full.answer_ids, "cls", 0.005)  # a handful of tokens
    far = drift(mine, theirs, full.answer_ids)
    p, answer = theirs.exp(), torch.tensor(full.answer_ids)
    kl = (p * (theirs - mine)).sum(-1)  # KL(full || reduced) written out
    assert far["kl"] > 0 and abs(far["kl"] - kl.mean().item()) < 1e-6
    assert (
        far["per_token"]["kl"]
        == torch.nn.functional.kl_div(mine, theirs, log_target=True, reduction="none").sum(-1).tolist()
    )
    assert abs(far["logprob"] - mine[range(len(answer)), answer].mean().item()) < 1e-6
    parted = (mine.argmax(-1) != answer).nonzero()
    assert far["first_divergence"] == (int(parted[0]) if len(parted) else None)
