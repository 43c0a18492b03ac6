"""GemFilter: a first pass through the LLM's first layers picks the visual tokens, then the whole
prefill runs again on the kept ones. Keeping everything is stock generate(); the second pass sees
exactly the text and the kept tokens; the choice is the official score recomputed from the model's own
hidden states; the first pass is the method's own time, and its FLOPs are counted in the prefill's."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import photo, run_seeing_embeds

from explorer import Budget, make, run
from explorer.engine.cost import FirstPass, Shape, first_pass_flops, prefill_flops
from explorer.evaluation import bench
from explorer.views import visual as vis

PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module")
def stock(checkpoint):
    """The same checkpoint, loaded by plain transformers, with nothing of ours attached."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    return model, transformers.AutoProcessor.from_pretrained(checkpoint)


def test_keeping_every_token_equals_stock_generate(backend, stock):
    model, processor = stock
    image = photo(640, 480, seed=3)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    inputs = processor(
        images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1] :]
    result = run(backend, image, PROMPT, "gemfilter", 1.0, max_new_tokens=12)
    assert list(result.answer_ids) == expected.tolist()
    assert result.tokens["visual_kept"] == result.tokens["visual_full"] == 2340


def test_the_first_pass_sees_every_token_and_the_second_only_the_text_and_the_kept_ones(backend):
    image = photo(640, 480, seed=4)
    result, embeds = run_seeing_embeds(backend, image, PROMPT, "gemfilter", 0.2)
    first, second = embeds  # the first pass, then the real prefill (one token: no decode step)
    prepared = backend.prepare(image, PROMPT)
    ids = prepared.inputs["input_ids"][0]
    assert len(first) == len(ids) and result.tokens["visual_kept"] == 468
    stay = backend.staying(prepared, result.selection.keep)  # (L,) the text and the kept visual tokens
    assert int(stay.sum()) == result.tokens["text"] + 468
    torch.testing.assert_close(second, first[stay], rtol=0, atol=0)  # exactly those, in prompt order


def official_scores(backend, image, layer: int) -> torch.Tensor:
    """The official score of every visual token (my_baseline/GemFilter/gem_filter_utils.py L6-34), from
    the hidden states the model itself computes: at `layer`, the last token's query after RoPE times every
    key after RoPE (L28-30; keys repeated over grouped heads), no scaling (L7), summed over heads (L10),
    averaged over 5 tokens with zero padding (L12-13); then the visual tokens' entries."""
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, _ = backend.encode(prepared, ())
        inputs = backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
        out = backend.model(**inputs, output_hidden_states=True)
    lm = backend.model.model.language_model
    block, x = lm.layers[layer], out.hidden_states[layer]  # the input of decoder layer `layer`
    x = block.input_layernorm(x)
    d, length = block.self_attn.head_dim, x.shape[1]
    positions = torch.arange(length)[None]
    cos, sin = lm.rotary_emb(x, positions)
    q = block.self_attn.q_proj(x).view(1, length, -1, d).transpose(1, 2)
    k = block.self_attn.k_proj(x).view(1, length, -1, d).transpose(1, 2)
    q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    inner = (q[:, :, -1:] @ k.transpose(-1, -2))[:, :, 0]  # (1, H, L)
    pooled = F.avg_pool1d(inner.sum(1, keepdim=True), kernel_size=5, padding=2, stride=1)[0, 0]  # (L,)
    image_positions = (prepared.inputs["input_ids"][0] == backend.image_token_id).nonzero()[:, 0]
    return pooled[image_positions]


@pytest.mark.parametrize("size, budget", [((640, 480), 0.2), ((336, 336), 0.5), ((400, 700), 0.1)])
def test_it_keeps_the_top_of_the_official_score_at_the_filter_layer(backend, size, budget):
    image = photo(*size, seed=size[1])
    result = run(backend, image, PROMPT, "gemfilter", budget, max_new_tokens=1)
    layer = make("gemfilter").early_layer(backend.depth)
    assert layer == math.floor(13 * 32 / 32 + 0.5) == 13  # 13 of 32: the tiny model has LLaVA-1.6-7B's 32 layers
    scores = official_scores(backend, image, layer)
    torch.testing.assert_close(result.selection.scores, scores, rtol=1e-4, atol=1e-4)
    k = result.tokens["visual_budget"]
    assert torch.equal(result.selection.keep, scores.topk(k).indices.sort().values)


def test_the_first_pass_is_the_methods_own_time_and_its_flops_are_counted(backend):
    """The first pass (from the LLM's first call to the filter layer) lies inside selection_s; the
    computed prefill FLOPs are the second pass's, as the floor's (uniform keeping as many) are, plus the
    first pass's on the whole prompt (checked against torch's count in tests/test_cost_merged_and_first_pass.py)."""
    lm = backend.model.model.language_model
    layer = make("gemfilter").early_layer(backend.depth)
    stamps = {}

    def stamp(name):
        def hook(*args):
            stamps.setdefault(name, time.perf_counter())  # the first call: the first pass

        return hook

    hooks = [lm.register_forward_pre_hook(stamp("start")), lm.layers[layer].register_forward_pre_hook(stamp("filter"))]
    try:
        result = run(backend, photo(640, 480, seed=5), PROMPT, "gemfilter", 0.2, max_new_tokens=2)
    finally:
        for hook in hooks:
            hook.remove()
    first_pass = stamps["filter"] - stamps["start"]
    timing = result.timing
    assert timing["selection_s"] >= first_pass > 0
    assert timing["ttft_s"] >= timing["selection_s"] + timing["prefill_s"]
    shape = Shape.of(backend.model.config)
    text = result.tokens["text"]
    first = first_pass_flops(shape, FirstPass(text + result.tokens["visual_full"], layer))
    assert result.cost["first_pass_flops"] == first > 0
    assert result.cost["prefill_flops"] == prefill_flops(shape, [text + 468] * backend.depth) + first
    done = {}
    rows = bench.sweep(
        backend, photo(640, 480), PROMPT, ["gemfilter"], [Budget(fraction=0.2)], 1, 1, 0, done, floor=True
    )
    gem, floor = rows[1], done["uniform", "468 tokens", 1]  # the floor keeps as many, with no first pass
    assert gem["over_floor"] == gem["ttft_s"] / floor["ttft_s"]
    assert gem["prefill_tflops"] == pytest.approx(floor["prefill_tflops"] + first / 1e12, rel=1e-12)


def test_it_is_explained_with_its_first_pass():
    text = vis.explain("gemfilter")
    assert "first pass through the LLM's first layers" in text and "Differs from the paper" in text
    assert "query-key products" in text
