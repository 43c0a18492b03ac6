"""End to end on the tiny LLaVA-NeXT: equivalence with stock transformers, real dropping, budgets,
signals, hooks, streaming, and runs that fail without hanging."""

import threading

import pytest
import torch
import transformers
from conftest import photo

from explorer import METHODS, Budget, ExplorerError, run, stream
from explorer.methods import on_images

PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module")
def stock(checkpoint):
    """The same checkpoint, loaded by plain transformers, with nothing of ours attached."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    return model, transformers.AutoProcessor.from_pretrained(checkpoint)


def stock_inputs(processor, image, prompt=PROMPT):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


@pytest.mark.parametrize("size", [(640, 480), (1008, 336), (300, 900)])
def test_no_reduction_equals_stock_generate_token_for_token(backend, stock, size):
    model, processor = stock
    image = photo(*size, seed=size[0])
    inputs = stock_inputs(processor, image)
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=24)[0, inputs["input_ids"].shape[1] :]
        stock_logits = model(**inputs).logits
    result = run(backend, image, PROMPT, "none", max_new_tokens=24)
    assert list(result.answer_ids) == expected.tolist()
    assert result.tokens["visual_kept"] == result.tokens["visual_full"]

    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, _ = backend.encode(prepared, ())
        full = backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
        torch.testing.assert_close(backend.model(**full).logits, stock_logits)
        reduced = backend.generate_inputs(prepared, features, torch.arange(0, len(prepared.geometry), 5))
        assert not torch.allclose(backend.model(**reduced).logits[0, -1], stock_logits[0, -1])  # the image matters


@pytest.mark.parametrize("method", [name for name in on_images() if METHODS[name].stage == "vision"])
def test_the_llm_receives_only_the_kept_tokens(backend, method):  # llm-stage methods: test_llm_methods.py
    lengths = []
    hook = backend.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        result = run(backend, photo(640, 480), PROMPT, method, 0.2, max_new_tokens=3)
    finally:
        hook.remove()
    if METHODS[method].early_layer is not None:  # GemFilter's first pass sees every token (test_gemfilter.py)
        assert lengths.pop(0) == result.tokens["text"] + result.tokens["visual_full"]
    assert lengths[0] == result.tokens["text"] + result.tokens["visual_kept"]  # prefill
    assert lengths[1:] == [1] * (len(lengths) - 1)  # then one token per step, on the short cache


@pytest.mark.parametrize("method", on_images())
@pytest.mark.parametrize("budget", [Budget(fraction=1.0), 0.4, 0.2, 0.1, Budget(tokens=1), Budget(tokens=2340)])
def test_every_method_keeps_exactly_its_budget(backend, method, budget):
    after = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}  # else B is a layer mean
    result = run(backend, photo(640, 480), PROMPT, method, budget, settings=after, max_new_tokens=1)
    t = result.tokens
    n, newlines = t["visual_full"], 36
    b = budget.resolve(n) if isinstance(budget, Budget) else Budget(fraction=budget).resolve(n)
    expected = {"none": n, "hired": min(b, n - newlines)}.get(method, b)
    assert n == 2340 and t["visual_kept"] == expected
    assert t["visual_budget"] == (n if method == "none" else b)
    assert sum(p["kept"] for p in t["by_partition"]) == t["visual_kept"]
    assert sum(p["full"] for p in t["by_partition"]) == n
    assert len(result.selection.keep) == t["visual_kept"]


def test_hired_end_to_end_reads_the_real_attention_and_keeps_the_top_tokens(backend, checkpoint):
    eager = transformers.LlavaNextForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager")
    image = photo(640, 480, seed=7)
    result = run(backend, image, PROMPT, "hired", 0.2, max_new_tokens=1)
    prepared = backend.prepare(image, PROMPT)
    src, g = prepared.source, result.geometry
    with torch.no_grad():
        crops = prepared.inputs["pixel_values"][0, : 1 + 4]  # thumbnail + 2x2 crops
        attentions = eager.model.vision_tower(crops, output_attentions=True).attentions
    eager_rows = {layer: attentions[layer][:, :, 0, 1:].sum(1).flatten()[src.clamp(min=0)] for layer in (0, 1)}

    torch.testing.assert_close(result.selection.maps["content"][:576], eager_rows[0][:576])
    feature = eager_rows[1]  # the tiny CLIP has 3 layers; features come from hidden_states[-2]
    torch.testing.assert_close(result.selection.scores[src >= 0], feature[src >= 0])
    b = result.tokens["visual_budget"]
    assert result.selection.budgets["base"] == min(b // 2, 576)
    assert sum(result.selection.budgets.values()) == b
    keep = result.selection.keep
    for p, name in enumerate(g.names[:-1]):
        members = g.members(p)
        kept = keep[g.partition[keep] == p]
        assert len(kept) == result.selection.budgets[name]
        if 0 < len(kept) < len(members):
            assert feature[kept].min() >= feature[members[~torch.isin(members, kept)]].max()


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_run_removes_its_hooks(backend):
    image = photo(800, 400)
    before = hook_count(backend.model)
    reference = run(backend, image, PROMPT, "none", max_new_tokens=12).answer_ids
    for method in on_images():
        after = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}  # 0.1 as a layer mean is
        run(backend, image, PROMPT, method, 0.1, settings=after, max_new_tokens=2)  # below PDrop's (8 of 32 see all)
        assert hook_count(backend.model) == before
    # 5% of 1752 is 87; FastV's first 2 of 32 layers see all 1752: at least (2 * 1752 + 30) / 32 = 110.4
    with pytest.raises(ExplorerError, match="fastv: a budget of 87 visual tokens per LLM layer"):
        run(backend, image, PROMPT, "fastv", 0.05, max_new_tokens=2)
    assert hook_count(backend.model) == before
    assert run(backend, image, PROMPT, "none", max_new_tokens=12).answer_ids == reference


def test_stream_yields_the_answer_as_it_grows(backend):
    results = list(stream(backend, photo(640, 480), PROMPT, "hired", 0.2, max_new_tokens=6, min_new_tokens=6))
    assert [r.done for r in results] == [False] * 7 + [True]
    assert [len(r.answer_ids) for r in results] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert results[0].selection is results[-1].selection and results[0].timing["ttft_s"] is None
    final = results[-1]
    timing = final.timing
    assert (
        0 < timing["preprocess_s"] + timing["vision_s"] + timing["selection_s"] < timing["ttft_s"] <= timing["total_s"]
    )
    assert 0 < timing["prefill_s"] < timing["ttft_s"] and timing["decode_tokens_per_s"] > 0
    assert final.memory["device"] == "cpu" and final.memory["peak_bytes"] > 100 * 2**20


def test_a_consumer_that_stops_early_frees_the_model(backend):
    runs = stream(backend, photo(640, 480), PROMPT, "cls", 0.2, max_new_tokens=50)
    next(runs)
    runs.close()
    assert len(run(backend, photo(640, 480), PROMPT, "cls", 0.2, max_new_tokens=2).answer_ids) >= 1


def test_a_failing_generation_raises_at_once(backend, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("generation broke")

    monkeypatch.setattr(backend.model, "generate", broken)
    with pytest.raises(RuntimeError, match="generation broke"):
        run(backend, photo(64, 64), PROMPT, "hired", timeout_s=60)
    monkeypatch.undo()
    assert run(backend, photo(64, 64), PROMPT, "hired", max_new_tokens=1).done


def test_a_stalled_generation_times_out(backend, monkeypatch):
    """A generate() that never gives a token is given up on after `timeout_s`: the run raises while that
    generate() is still stuck, not after it comes back."""
    release, returned = threading.Event(), threading.Event()

    def stalled(**kwargs):  # stuck until the test lets it go (at most 60 s, so nothing hangs), then ends
        try:
            release.wait(timeout=60)
            if kwargs.get("streamer") is not None:
                kwargs["streamer"].end()  # so a run that never timed out would end here, without an error
        finally:
            returned.set()

    monkeypatch.setattr(backend.model, "generate", stalled)
    try:
        with pytest.raises(ExplorerError, match="stalled: no token for 0.5 s"):
            run(backend, photo(64, 64), PROMPT, "hired", timeout_s=0.5)
        came_back_first = returned.is_set()
    finally:
        release.set()
        returned.wait(timeout=60)
    assert not came_back_first, "the run waited for the stalled generate() to come back"
    monkeypatch.undo()
    assert run(backend, photo(64, 64), PROMPT, "hired", max_new_tokens=1).done  # the model is free again


@pytest.mark.parametrize("where", ["vision", "generate"])
def test_out_of_memory_gives_a_clear_message_and_the_next_run_works(backend, monkeypatch, where):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    target = backend.model.model.vision_tower if where == "vision" else backend.model
    monkeypatch.setattr(target, "forward" if where == "vision" else "generate", oom)
    with pytest.raises(ExplorerError, match="out of memory on cpu; try a smaller budget, image or model"):
        run(backend, photo(64, 64), PROMPT, "hired")
    monkeypatch.undo()
    assert run(backend, photo(64, 64), PROMPT, "hired", max_new_tokens=1).done


def test_a_prompt_longer_than_the_model_allows_is_refused(backend):
    with pytest.raises(ExplorerError, match="exceeds the model's 4096 positions"):
        run(backend, photo(64, 64), "describe " * 2200, "none")  # under MAX_PROMPT_CHARS, over 4096 tokens
    assert run(backend, photo(64, 64), "describe " * 250, "hired", max_new_tokens=1).done  # long but fits


@pytest.mark.parametrize("prompt", ["", "   \n", None])
def test_an_empty_prompt_is_refused(backend, prompt):
    with pytest.raises(ExplorerError, match="the prompt is empty"):
        run(backend, photo(64, 64), prompt)


def test_the_result_has_the_fields_of_the_design(backend):
    result = run(backend, photo(640, 480), PROMPT, "hired", 0.2, max_new_tokens=2).to_json()
    assert set(result) >= {"model", "method", "budget", "answer", "tokens", "timing", "memory"}
    assert set(result["tokens"]) >= {"visual_full", "visual_kept", "text", "by_partition"}
    assert set(result["timing"]) >= {"ttft_s", "prefill_s", "decode_tokens_per_s", "total_s", "selection_s"}
    assert set(result["memory"]) == {"device", "peak_bytes"}
    assert result["budget"] == 0.2 and result["model"] == "tiny-llava-next" and result["random_weights"]
    assert [p["name"] for p in result["tokens"]["by_partition"]] == [
        "base",
        "crop 0,0",
        "crop 0,1",
        "crop 1,0",
        "crop 1,1",
        "newline",
    ]
