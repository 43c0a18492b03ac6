"""A cut inside the LLM that merges (`llm_prune.pruning`'s `mix`, `Selection.mixes` "llm-residual"), on the
tiny LLaVA-NeXT: identity weights are a plain cut, bit for bit, and a merge of two tokens enters the cut
layer as their weighted mean, exactly, seen by hooks on that layer; decoding on the merged cache equals
rerunning the whole sequence without a cache."""

import torch
from conftest import photo

PROMPT = "What is shown in this image?"
CUT = [(2, 1)]  # before layer 2, scored at layer 1


def prompt_of(backend, seed: int = 3):
    """The prepared prompt, its generate() inputs with every visual token, and N."""
    prepared = backend.prepare(photo(336, 336, seed=seed), PROMPT)
    with torch.no_grad():
        features, _ = backend.encode(prepared, ())
    n = len(prepared.geometry)
    return prepared, backend.generate_inputs(prepared, features, torch.arange(n)), n


def weights(keep: torch.Tensor, n: int, rows=(), columns=(), values=(), own: float = 1.0) -> torch.Tensor:
    """(K, N) sparse: every kept token carries itself (`own` of it where another joins it), then `values` of
    `columns` go into kept rows `rows`."""
    rows, columns = torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)
    itself = torch.ones(len(keep)).index_fill_(0, rows, own)
    index = torch.stack([torch.cat([torch.arange(len(keep)), rows]), torch.cat([keep, columns])])
    values = torch.cat([itself, torch.tensor(values, dtype=torch.float)])
    return torch.sparse_coo_tensor(index, values, (len(keep), n), check_invariants=True).coalesce()


def logits_with(backend, prepared, inputs, keep, mix):
    with torch.no_grad(), backend.pruning(prepared, CUT, (), lambda cut, maps, alive: keep, True, mix=mix):
        return backend.model(**inputs).logits


def test_a_merge_with_identity_weights_is_a_plain_cut(backend):
    prepared, inputs, n = prompt_of(backend)
    keep = torch.arange(0, n, 3)  # every third visual token
    cut = logits_with(backend, prepared, inputs, keep, None)
    assert torch.equal(logits_with(backend, prepared, inputs, keep, lambda cut: weights(keep, n)), cut)
    merged = weights(keep, n, [0], [1], [1.0])  # the first kept token also carries token 1
    assert not torch.equal(logits_with(backend, prepared, inputs, keep, lambda cut: merged), cut)


def test_a_merge_of_two_tokens_enters_the_cut_layer_as_their_weighted_mean(backend):
    prepared, inputs, n = prompt_of(backend)
    image = (prepared.inputs["input_ids"][0] == backend.visual_token_id(prepared)).nonzero()[:, 0]  # (N,)
    keep = torch.arange(n)[torch.arange(n) != 7]  # token 7 goes into token 3: 0.25 of 3 and 0.75 of 7
    mix = weights(keep, n, [3], [7], [0.75], own=0.25)
    seen = {}

    def before(module, args):  # registered before the cut's hooks: the whole sequence
        seen["before"] = args[0][0].clone()

    def after(module, args, output):  # what the layer ran on
        seen["after"] = args[0][0].clone()

    layer = backend.language_model.layers[CUT[0][0]]
    handles = [layer.register_forward_pre_hook(before)]
    with torch.no_grad(), backend.pruning(prepared, CUT, (), lambda cut, maps, alive: keep, True, mix=lambda c: mix):
        handles.append(layer.register_forward_hook(after))
        backend.model(**inputs)
    for handle in handles:
        handle.remove()
    full, short = seen["before"], seen["after"]  # (L, D), (L - 1, D)
    stay = torch.arange(len(full)) != image[7]
    expected = full[stay].clone()
    expected[image[3]] = 0.25 * full[image[3]] + 0.75 * full[image[7]]  # token 3 comes before token 7
    assert len(short) == len(full) - 1 and torch.equal(short, expected)


def test_decoding_on_a_merged_cache_equals_rerunning_without_a_cache(backend):
    prepared, inputs, n = prompt_of(backend, seed=4)
    keep = torch.arange(0, n, 2)
    merged = torch.arange(1, n, 2)  # every odd token, half into the token before it
    mix = weights(keep, n, torch.arange(len(merged)).tolist(), merged.tolist(), [0.5] * len(merged))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), backend.pruning(prepared, CUT, (), lambda cut, maps, alive: keep, True, mix=lambda c: mix):
        out = backend.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=3,
            min_new_tokens=3,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, length:]
    for t in range(len(new)):  # the whole sequence so far, no cache, the same merge
        ids = torch.cat([inputs["input_ids"], new[None, :t]], 1)
        mask = torch.ones_like(ids)
        replay = backend.pruning(prepared, CUT, (), lambda cut, maps, alive: keep, True, mix=lambda c: mix)
        with torch.no_grad(), replay:
            logits = backend.model(
                input_ids=ids, attention_mask=mask, mm_encoder_outputs=inputs["mm_encoder_outputs"], use_cache=False
            ).logits[0, -1]
        torch.testing.assert_close(logits, out.logits[t][0], rtol=1e-4, atol=1e-4)
