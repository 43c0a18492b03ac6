"""Qwen3.5 (backends/qwen3_5.py) on its tiny random-weight model (Qwen3.5-0.8B's 24 LLM layers: three
linear-attention ones, then a full-attention one, six times), loaded through `backends.load`: no reduction
answers as stock generate() does; vision methods meet their budget; a cut inside the LLM, before a
linear-attention layer or a full-attention one, gives the logits of the model's own layers run by hand on the
sequence with the cut tokens removed from that layer on, in the prefill and in the decode step after it (the
linear layers' states then sum up the short sequence); the attention the hooks score with is the model's own
(its gated queries split off); what a hybrid LLM cannot do is refused with the reason; the processor counts the
published processor's visual tokens; the chat format; a clip; the stored 0.8B architecture; the computed vision
and LLM costs (the linear layers hold no KV cache); the MoE checkpoints."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import photo
from test_video_backend import clip as drawn

import backends
from explorer import Budget, ExplorerError, run
from explorer.core import LLM_ATTENTION
from explorer.engine.video import Clip
from explorer.methods import METHODS, unavailable

PROMPT = "What is shown in this image?"
MIRROR = Path(__file__).parent / "mirrors" / "Qwen--Qwen3.5-0.8B"


@pytest.fixture(scope="module")
def qwen35():
    return backends.load("tiny-qwen3.5", "cpu")


@pytest.fixture(scope="module")
def encoded(qwen35):
    """(prepared, features) of a 320x256 image: 10 x 8 = 80 tokens."""
    prepared = qwen35.prepare(photo(320, 256, seed=3), PROMPT)
    with torch.inference_mode():
        features, _ = qwen35.encode(prepared, ())
    return prepared, features


def test_none_answers_token_for_token_as_stock_generate(qwen35):
    image = photo(320, 240, seed=1)
    result = run(qwen35, image, PROMPT, "none", max_new_tokens=4, min_new_tokens=4)
    prepared = qwen35.prepare(image, PROMPT)
    with torch.inference_mode():
        out = qwen35.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    assert type(qwen35) is backends.BACKENDS["qwen3_5"] and qwen35.depth == 24
    assert qwen35.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 6
    assert qwen35.model.config.text_config.max_position_embeddings == 262144


def test_the_chat_format_is_the_published_one_without_thinking(qwen35):
    """One user turn, the image then the text, and the generation prompt with an empty thinking block, as the
    published template renders it with enable_thinking=False (tests/mirrors/Qwen--Qwen3.5-0.8B)."""
    want = (
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert qwen35.chat(PROMPT) == want
    published = json.loads((MIRROR / "chat_template.json").read_text())["chat_template"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    render = qwen35.processor.apply_chat_template
    assert render(messages, chat_template=published, add_generation_prompt=True, enable_thinking=False) == want
    thinking = render(messages, chat_template=published, add_generation_prompt=True)
    assert thinking == render(messages, add_generation_prompt=True) == want.removesuffix("\n</think>\n\n")
    assert qwen35.chat(PROMPT, part="video").count("<|video_pad|>") == 1


@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_vision_methods_meet_their_budget(qwen35, budget):
    image = photo(320, 256, seed=2)
    for method in ("random", "visionzip", "divprune"):
        result = run(qwen35, image, PROMPT, method, budget, max_new_tokens=1)
        want = Budget(fraction=budget).resolve(80)
        assert result.tokens["visual_kept"] == want == len(result.selection.keep), method


def test_a_clip_answers_as_stock_and_a_cut_meets_its_budget(qwen35):
    """A clip of 4 frames, as Qwen3-VL takes it: 2 temporal groups (partitions) of 5 x 4 tokens, each after its
    time as text; no reduction answers as stock generate(), FastV after layer 3 keeps its budget of the 40."""
    frames, times = drawn(4, (160, 120), 0), [0.0, 0.5, 1.0, 1.5]
    prepared = qwen35.prepare_video(frames, PROMPT, times, 2.0)
    assert prepared.geometry.names == ("frames 0-1", "frames 2-3") and len(prepared.geometry) == 40
    clip = Clip(frames, [0, 5, 10, 15], times, 10.0, 2.0, False)
    result = run(qwen35, clip, PROMPT, "none", max_new_tokens=3, min_new_tokens=3)
    with torch.inference_mode():
        out = qwen35.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    settings = {"layer": 4, "budget_after_cuts": True}
    assert run(qwen35, clip, PROMPT, "fastv", 0.25, settings=settings, max_new_tokens=1).tokens["visual_kept"] == 10


def by_hand(backend, prepared, features, keep, layer, keep_positions=True, token=0):
    """The logits of the last prompt token and of the next one (`token`), from the model's parts: the
    prompt embedded with every visual token, decoder layers 0..layer-1 on it, then only the text and the kept
    visual tokens (keep, (K,) indices into N); a cache of the model's own kind (KV caches for the
    full-attention layers, conv and recurrent states for the linear ones) filled by that prefill, then one
    decode step on it. Renumbered (not keep_positions), from the cut on a token moves back by the tokens cut
    before it, on all three M-RoPE axes, the decoded one by all of them."""
    lm = backend.language_model
    ids = prepared.inputs["input_ids"]  # (1, L)
    visual = (ids[0] == backend.visual_token_id(prepared)).nonzero()[:, 0]  # (N,)
    x = lm.embed_tokens(ids).clone()  # (1, L, D)
    x[0, visual] = features
    full = backend.positions(prepared)  # (3, 1, L)
    seq = torch.arange(ids.shape[1])  # the prompt positions in the sequence
    cache = transformers.DynamicCache(config=lm.config)
    for index, block in enumerate(lm.layers):
        if index == layer:
            stay = ~torch.isin(seq, visual) | torch.isin(seq, visual[keep])
            seq, x = seq[stay], x[:, stay]
        moved = 0 if keep_positions or index < layer else seq - torch.arange(len(seq))
        x = block(x, position_embeddings=lm.rotary_emb(x, full[..., seq] - moved), past_key_values=cache)
    first = backend.model.lm_head(lm.norm(x))[0, -1]
    y = lm.embed_tokens(torch.tensor([[token]]))  # (1, 1, D)
    step = full.max() + 1
    for index, block in enumerate(lm.layers):
        moved = 0 if keep_positions or index < layer else ids.shape[1] - len(seq)
        y = block(
            y, position_embeddings=lm.rotary_emb(y, (step - moved).view(1, 1, 1).expand(3, 1, 1)), past_key_values=cache
        )
    return first, backend.model.lm_head(lm.norm(y))[0, -1]


@pytest.mark.parametrize("layer, score_layer, keep_positions", [(4, 3, True), (7, 7, True), (4, 3, False)])
def test_a_cut_inside_the_llm_is_the_models_layers_on_the_short_sequence(
    qwen35, encoded, layer, score_layer, keep_positions
):
    """Cut before linear-attention layer 4 (scored at full-attention layer 3, as FastV scores) or before
    full-attention layer 7 (scored there): generate()'s first two logits are the hand-written prefill's and
    decode step's, with the linear layers from the cut on reading only the kept tokens."""
    prepared, features = encoded
    n = len(prepared.geometry)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(layer))[: n // 4].sort().values
    inputs = qwen35.generate_inputs(prepared, features, torch.arange(n))
    with torch.inference_mode():
        with qwen35.pruning(prepared, [(layer, score_layer)], (), lambda cut, maps, alive: keep, keep_positions):
            out = qwen35.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=2,
                min_new_tokens=2,
                output_logits=True,
                return_dict_in_generate=True,
            )
        token = int(out.sequences[0, inputs["input_ids"].shape[1]])
        first, second = by_hand(qwen35, prepared, features, keep, layer, keep_positions, token)
        unpruned, _ = by_hand(qwen35, prepared, features, torch.arange(n), layer)
    torch.testing.assert_close(out.logits[0][0], first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1][0], second, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first, unpruned, rtol=1e-3, atol=1e-3)  # the cut changes what the layers see


def test_dropped_before_the_llm_is_stock_on_the_short_prompt(qwen35, encoded):
    """A vision method's drop (a cut before layer 0) is the stock model on the prompt without the dropped tokens."""
    prepared, features = encoded
    keep = torch.arange(0, len(prepared.geometry), 3)
    with torch.inference_mode():
        stock = qwen35.model(**qwen35.generate_inputs(prepared, features, keep), use_cache=False).logits[0, -1]
        first, _ = by_hand(qwen35, prepared, features, keep, 0)
    torch.testing.assert_close(stock, first, rtol=1e-4, atol=1e-4)


def test_the_llm_hooks_score_with_the_attention_the_model_computes(qwen35, encoded):
    """The "llm-attention" signal at full-attention layer 3 equals its eager attention weights of the text rows
    over the visual tokens: the query is the first half of each head's q_proj output (the second its gate)."""
    prepared, features = encoded
    n = len(prepared.geometry)
    inputs = qwen35.generate_inputs(prepared, features, torch.arange(n))
    seen = {}

    def choose(cut, maps, alive):
        seen.update(maps)
        return torch.arange(n)

    qwen35.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), qwen35.pruning(prepared, [(4, 3)], (LLM_ATTENTION,), choose, True):
            out = qwen35.model(**inputs, use_cache=False, output_attentions=True)
    finally:
        qwen35.model.set_attn_implementation("sdpa")
    ids = prepared.inputs["input_ids"][0]
    visual = (ids == qwen35.image_token_id).nonzero()[:, 0]
    text = torch.arange(int(visual.max()) + 1, len(ids))
    want = out.attentions[0][0][:, text][:, :, visual]  # (H, T, N): the first full-attention layer's, layer 3
    torch.testing.assert_close(seen[LLM_ATTENTION], want.float(), rtol=1e-4, atol=1e-6)


def test_fastv_runs_after_a_full_attention_layer_and_says_why_not_elsewhere(qwen35):
    """FastV cut before layer 8 (scored at full-attention layer 7) meets its budget, decoding with the cache or
    without (`rerank`, every pass over the whole sequence); GemFilter's first pass stops before full-attention
    layer 11 (its layer 14 of 32); scored at a linear-attention layer, or cutting before layer 4, they are
    refused with the reason."""
    image = photo(320, 256, seed=4)
    for budget, rerank in ((0.25, False), (0.1, True)):
        settings = {"layer": 8, "budget_after_cuts": True, "rerank": rerank}
        result = run(qwen35, image, PROMPT, "fastv", budget, settings=settings, max_new_tokens=2)
        assert result.tokens["visual_kept"] == Budget(fraction=budget).resolve(80)
    result = run(qwen35, image, PROMPT, "gemfilter", 0.25, settings={"layer": 14}, max_new_tokens=1)
    assert result.tokens["visual_kept"] == 20
    with pytest.raises(ExplorerError, match="cannot cut before LLM layer 2: .* first full-attention layer, 3"):
        run(qwen35, image, PROMPT, "fastv", 0.25, max_new_tokens=1)  # its default K = 2
    with pytest.raises(ExplorerError, match="cannot score a cut at LLM layer 6: it is a linear-attention"):
        run(qwen35, image, PROMPT, "fastv", 0.25, settings={"layer": 7, "budget_after_cuts": True}, max_new_tokens=1)
    with pytest.raises(ExplorerError, match="cannot read attention logits at LLM layer"):
        run(qwen35, image, PROMPT, "gemfilter", 0.25, max_new_tokens=1)  # its default: layer 13 of 32, 10 of 24


def test_what_a_hybrid_llm_cannot_do_is_refused_by_name(qwen35):
    """Decode-time cache cuts (MustDrop, DyCoke) and every layer's attention (TransPrune-LLM): refused with the
    reason; every method that scores inside the LLM otherwise stays on offer (its cuts are checked at run time)."""
    refused = {m: unavailable(m, qwen35, clip=True) for m in METHODS}
    for method in ("mustdrop", "dycoke", "transprune-llm"):
        assert "linear-attention" in refused[method], method
    assert "KV caches while decoding" in refused["mustdrop"] and "token transition" in refused["transprune-llm"]
    assert not any(refused[m] for m in ("fastv", "pdrop", "dart", "sparsevlm", "aim", "none", "random"))
    prepared = qwen35.prepare(photo(64, 64), PROMPT)
    with pytest.raises(ExplorerError, match="cannot cut or narrow the KV caches while decoding"):
        with qwen35.pruning(prepared, [(4, 3)], (), None, True, compact_from=4):
            pass


def test_the_processor_counts_the_published_processors_tokens(qwen35):
    """One token per 32x32 px (patch 16, 2x2 merge), as the published image processor (the mirror's
    preprocessor_config.json) counts: 1024x768 -> 32 x 24 = 768; 672x672 -> 21 x 21 = 441."""
    published = transformers.AutoImageProcessor.from_pretrained(MIRROR)
    for (width, height), count in {(1024, 768): 768, (672, 672): 441}.items():
        image = photo(width, height)
        prepared = qwen35.prepare(image, PROMPT)
        grid = published(images=image, return_tensors="pt")["image_grid_thw"][0]
        assert len(prepared.geometry) == count == int(grid.prod()) // 4
        assert count == int((prepared.inputs["input_ids"] == qwen35.image_token_id).sum())


def test_the_full_size_architecture_is_stored(qwen35):
    """Qwen3.5-0.8B built on the meta device from backends/configs/: 24 LLM layers of the tiny model's kinds, the
    tiny model's image geometry."""
    config = backends.stored_config("Qwen/Qwen3.5-0.8B")
    assert config.model_type == "qwen3_5" and config.text_config.layer_types == qwen35.layer_types
    assert backends.FULL_SIZE["Qwen/Qwen3.5-0.8B"] == "tiny-qwen3.5"
    built = backends.full_size("Qwen/Qwen3.5-0.8B", torch.device("meta"))
    assert type(built) is type(qwen35) and built.depth == 24 and built.layer_types == qwen35.layer_types
    assert len(built.layout([672, 672])[0]) == len(qwen35.layout([672, 672])[0]) == 441
    published = json.loads((MIRROR / "config.json").read_text())
    assert built.model.config.text_config.hidden_size == published["text_config"]["hidden_size"] == 1024


def test_the_27b_architecture_is_stored():
    """Qwen3.5-27B, the checkpoint transformers' docs name, for --random-weights: its LLM's sizes as public copies
    of its text config give them (a Megatron-Bridge test's, find_string id 54606761696, and THUDM/slime's
    scripts/models/qwen3.5-27B.sh: 64 layers of 5120, MLP 17408, 24 heads of 256, 4 KV heads, linear-attention
    heads 16 (keys) and 48 (values) of 128, untied); its vision tower INFERRED: Qwen3.5's ViT as transformers'
    Qwen3_5VisionConfig defaults give it (27 blocks of 1152, MLP 4304, 16 heads), with output width 5120. Built on
    the meta device: 27.36e9 weights, 16 full-attention layers."""
    built = backends.full_size("Qwen/Qwen3.5-27B", torch.device("meta"))
    assert built.depth == 64 and built.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 16
    assert abs(sum(p.numel() for p in built.model.parameters()) - 27.36e9) < 0.01e9


def test_the_moe_checkpoints_run_on_the_same_code(tmp_path):
    """A tiny qwen3_5_moe checkpoint (the tiny model's config with 4 experts, 2 a token) loads as Qwen35Moe,
    answers as stock generate() and runs a cut inside the LLM."""
    from backends import qwen3_5, random_models

    config, processor = qwen3_5.random_parts("tiny-qwen3.5")
    values = config.to_dict()
    experts = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    experts |= {"shared_expert_intermediate_size": 32, "num_hidden_layers": 8}
    text = values["text_config"] | experts | {"model_type": "qwen3_5_moe_text"}
    text["layer_types"] = text["layer_types"][:8]
    moe = transformers.Qwen3_5MoeConfig(
        text_config=text,
        vision_config=values["vision_config"] | {"model_type": "qwen3_5_moe_vision"},
        **{k: v for k, v in values.items() if k.endswith("_token_id")},
    )
    random_models.save_random("Qwen3_5MoeForConditionalGeneration", moe, processor, tmp_path)
    backend = backends.load(str(tmp_path), "cpu")
    assert type(backend) is backends.BACKENDS["qwen3_5_moe"]
    image = photo(320, 240, seed=1)
    result = run(backend, image, PROMPT, "none", max_new_tokens=3, min_new_tokens=3)
    prepared = backend.prepare(image, PROMPT)
    with torch.inference_mode():
        out = backend.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    settings = {"layer": 4, "budget_after_cuts": True}
    cut = run(backend, image, PROMPT, "fastv", 0.25, settings=settings, max_new_tokens=2)
    assert cut.tokens["visual_kept"] == Budget(fraction=0.25).resolve(len(prepared.geometry))


def test_the_computed_vision_cost_is_what_torch_counts(qwen35, monkeypatch):
    """Qwen3-VL's encoder and merger, without DeepStack's mergers: the vision FLOPs computed (explorer/engine/cost.py)
    are within 5% of torch's count, with eager attention; a run on the tiny model is projected on the 0.8B."""
    from test_vision_cost import counted_run

    qwen35.model.set_attn_implementation("eager")
    try:
        for method in ("none", "visionzip"):
            result, counted = counted_run(qwen35, photo(400, 300), method, monkeypatch)
            assert abs(result.cost["vision_flops"] - counted) <= 0.05 * counted, (method, counted)
            assert result.cost["projected"]["model"] == "Qwen/Qwen3.5-0.8B"
    finally:
        qwen35.model.set_attn_implementation("sdpa")


def test_the_computed_llm_cost_counts_the_hybrid_layers(qwen35):
    """Torch's count of a full-attention layer on T tokens (eager, so q.k and the weighted sum of v count) is the
    analytic one, the query's gate included; a linear-attention layer's matrix products (aten.mm) are its analytic
    projections and MLP (its recurrence is an estimate: transformers' chunked kernel computes more); the KV cache
    is the full-attention layers' alone; the stored 0.8B's weights are counted within 0.1%."""
    from torch.utils.flop_counter import FlopCounterMode

    from explorer.engine.cost import Shape, _layer_macs, _layer_weights, kv_bytes, parameters

    lm, shape, t = qwen35.language_model, Shape.of(qwen35.model.config), 37
    x = torch.randn(1, t, shape.hidden)
    cos_sin = lm.rotary_emb(x, torch.arange(t).view(1, 1, t).expand(3, 1, t))
    qwen35.model.set_attn_implementation("eager")
    try:
        counts = {}
        for layer in (3, 4):  # full, linear
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                lm.layers[layer](x, position_embeddings=cos_sin)
            counts[layer] = counter.get_flop_counts()["Global"]
    finally:
        qwen35.model.set_attn_implementation("sdpa")
    assert sum(counts[3].values()) == 2 * _layer_macs(shape, t, 3)
    assert counts[4][torch.ops.aten.mm] == 2 * t * _layer_weights(shape, 4)
    assert shape.linear == tuple(i for i in range(24) if i % 4 != 3) and shape.gated_query
    assert kv_bytes(shape, [t] * 24, 4) == 6 * t * 2 * 2 * 32 * 4  # 6 full layers, 2 KV heads of 32
    built = backends.full_size("Qwen/Qwen3.5-0.8B", torch.device("meta"))
    count = sum(p.numel() for p in built.model.parameters())
    assert abs(count - 0.853e9) < 0.001e9 and 0 < count - parameters(built.model.config) < 0.001 * count
