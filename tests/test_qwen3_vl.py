"""Qwen3-VL (backends/qwen3_vl.py) on its tiny random-weight model, loaded through `backends.load`: no
reduction answers as stock generate() does, on an image and on a clip; tokens dropped before the LLM or cut
inside it take their DeepStack features with them, and the ones left get theirs at their places (checked
against a forward pass written out by hand from the model's parts, and shown to fail when the features are
misaligned); the attention the LLM-stage hooks score with is the model's own (Qwen3 normalises queries and
keys per head); every method runs or says why, and meets its budget; the processor counts the published
rule's visual tokens; batches, the stored 2B architecture, the computed vision cost and the MoE checkpoints."""

import pytest
import torch
import transformers
from conftest import photo
from test_video_backend import clip as drawn

import backends
from backends.qwen3_vl import MAX_PIXELS
from explorer import Budget, ExplorerError, run
from explorer.core import LLM_ATTENTION
from explorer.engine.cost import parameters
from explorer.engine.video import Clip
from explorer.methods import METHODS, unavailable

PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module")
def qwen3():
    return backends.load("tiny-qwen3-vl", "cpu")


@pytest.fixture(scope="module")
def encoded(qwen3):
    """(prepared, features) of a 448x320 image: 14 x 10 = 140 tokens, each with its LLM input and 3 DeepStack features."""
    prepared = qwen3.prepare(photo(448, 320, seed=3), PROMPT)
    with torch.inference_mode():
        features, _ = qwen3.encode(prepared, ())
    return prepared, features


def test_none_answers_token_for_token_as_stock_generate(qwen3):
    image = photo(320, 240, seed=1)
    result = run(qwen3, image, PROMPT, "none", max_new_tokens=6, min_new_tokens=6)
    prepared = qwen3.prepare(image, PROMPT)
    with torch.inference_mode():
        out = qwen3.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    assert type(qwen3) is backends.BACKENDS["qwen3_vl"] and qwen3.stacked == 3


def test_kept_tokens_keep_their_m_rope_positions(qwen3):
    """The LLM gets the kept tokens (and the text) at their positions in the unreduced prompt, as the model
    computes them (`get_rope_index`), and the answer goes on after the unreduced prompt's last position."""
    image, seen = photo(448, 320, seed=2), []
    handle = qwen3.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        result = run(qwen3, image, PROMPT, "random", 0.3, max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    prepared = qwen3.prepare(image, PROMPT)
    full = qwen3.positions(prepared)  # (3, 1, L)
    stay = qwen3.staying(prepared, result.selection.keep)
    prefill, *steps = seen
    assert torch.equal(prefill[1:], full[..., stay]) and len(steps) == 2
    last = int(full.max())
    assert [step[1:].flatten().tolist() for step in steps] == [[last + 1] * 3, [last + 2] * 3]


def test_features_carry_the_deepstack_features_of_each_token(qwen3, encoded):
    prepared, features = encoded
    with torch.inference_mode():
        out = qwen3.model.model.get_image_features(
            prepared.inputs["pixel_values"], prepared.inputs["image_grid_thw"], return_dict=True
        )
        _, signals = qwen3.encode(prepared, ("features",))
    d = qwen3.width
    assert features.shape == (len(prepared.geometry), 4 * d)
    torch.testing.assert_close(features[:, :d], out.pooler_output[0])
    for s, stack in enumerate(out.deepstack_features):
        torch.testing.assert_close(features[:, d * (s + 1) : d * (s + 2)], stack[0])
    torch.testing.assert_close(signals["features"], out.pooler_output[0])  # methods read the LLM input alone


def by_hand(backend, prepared, features, keep, layer, keep_positions=True, misalign=False):
    """The last prompt token's logits, from the model's parts: the whole prompt embedded with every visual
    token, decoder layers 0..layer-1 on it, then only the text and the kept visual tokens (keep, (K,)
    indices into N), each layer s < S adding DeepStack features s at the visual tokens in the sequence
    (with `misalign`, the first K of them: the features left unpruned). Renumbered (not keep_positions),
    a token after the cut moves back by the tokens cut before it, on all three M-RoPE axes."""
    lm, d = backend.language_model, backend.width
    ids = prepared.inputs["input_ids"]  # (1, L)
    visual = (ids[0] == backend.visual_token_id(prepared)).nonzero()[:, 0]  # (N,)
    token = torch.full((ids.shape[1],), -1)
    token[visual] = torch.arange(len(visual))  # each prompt position's visual token, -1 for text
    x = lm.embed_tokens(ids).clone()  # (1, L, D)
    x[0, visual] = features[:, :d]
    stacks = features[:, d:].split(d, 1)  # S x (N, D)
    full = backend.positions(prepared)  # (3, 1, L)
    seq = torch.arange(ids.shape[1])  # the prompt positions in the sequence
    for index, block in enumerate(lm.layers):
        if index == layer:
            stay = (token[seq] < 0) | torch.isin(token[seq], keep)
            seq, x = seq[stay], x[:, stay]
        moved = 0 if keep_positions or index < layer else seq - torch.arange(len(seq))
        x = block(x, attention_mask=None, position_embeddings=lm.rotary_emb(x, full[..., seq] - moved))
        if index < len(stacks):
            here = token[seq] >= 0
            picked = token[seq][here]
            if misalign and index >= layer:
                picked = torch.arange(int(here.sum()))
            x[0, here] = x[0, here] + stacks[index][picked]
    return backend.model.lm_head(lm.norm(x))[0, -1]


@pytest.mark.parametrize("layer, keep_positions", [(0, True), (1, True), (2, True), (2, False), (3, True)])
def test_dropped_tokens_take_their_deepstack_features_with_them(qwen3, encoded, layer, keep_positions):
    """Dropped before the LLM (layer 0) or cut before layer 1 or 2, inside the first three layers, which
    add DeepStack features: the logits are those of the hand-written pass, not those of one that leaves
    the features unpruned. Cut before layer 3, after the last addition, the two are the same."""
    prepared, features = encoded
    n = len(prepared.geometry)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(layer))[: n // 3].sort().values
    with torch.inference_mode():
        if layer == 0:
            logits = qwen3.model(**qwen3.generate_inputs(prepared, features, keep), use_cache=False).logits[0, -1]
        else:
            inputs = qwen3.generate_inputs(prepared, features, torch.arange(n))
            chosen = qwen3.pruning(prepared, [(layer, layer)], (), lambda cut, maps, alive: keep, keep_positions)
            with chosen as record:
                logits = qwen3.model(**inputs, use_cache=False).logits[0, -1]
            assert torch.equal(record.keeps[0], keep)
        want = by_hand(qwen3, prepared, features, keep, layer, keep_positions)
        wrong = by_hand(qwen3, prepared, features, keep, layer, keep_positions, misalign=True)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(logits, wrong, rtol=1e-3, atol=1e-3) == (layer >= qwen3.stacked)  # 3: all added before


def test_a_clip_answers_as_stock_and_a_cut_keeps_its_deepstack_features_aligned(qwen3):
    """A clip of 4 frames: 2 temporal groups (partitions) of 5 x 4 tokens, each after its time as text; no
    reduction answers as stock generate(); a cut before layer 2 matches the hand-written pass."""
    frames, times = drawn(4, (160, 120), 0), [0.0, 0.5, 1.0, 1.5]
    prepared = qwen3.prepare_video(frames, PROMPT, times, 2.0)
    assert prepared.geometry.names == ("frames 0-1", "frames 2-3") and len(prepared.geometry) == 2 * 5 * 4
    text = qwen3.tokenizer.decode(prepared.inputs["input_ids"][0])
    assert "<0.2 seconds><|vision_start|>" in text and "<1.2 seconds><|vision_start|>" in text  # 0.25 s, 1.25 s
    result = run(qwen3, Clip(frames, [0, 5, 10, 15], times, 10.0, 2.0, False), PROMPT, "none", max_new_tokens=4)
    with torch.inference_mode():
        out = qwen3.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=4, min_new_tokens=4)
        features, _ = qwen3.encode(prepared, ())
        n = len(prepared.geometry)
        keep = torch.arange(0, n, 3)
        inputs = qwen3.generate_inputs(prepared, features, torch.arange(n))
        with qwen3.pruning(prepared, [(2, 2)], (), lambda cut, maps, alive: keep, True):
            logits = qwen3.model(**inputs, use_cache=False).logits[0, -1]
        want = by_hand(qwen3, prepared, features, keep, 2)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ExplorerError, match="cannot take this clip"):
        qwen3.prepare_video(frames[:1], PROMPT)  # fewer frames than a temporal group


def test_clip_methods_meet_their_budget(qwen3):
    clip = Clip(drawn(4, (160, 120), 1), [0, 5, 10, 15], [0.0, 0.5, 1.0, 1.5], 10.0, 2.0, False)
    for method in ("frames", "fastvid", "random", "fastv"):
        settings = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}
        result = run(qwen3, clip, PROMPT, method, 0.25, settings=settings, max_new_tokens=1)
        assert result.tokens["visual_kept"] == Budget(fraction=0.25).resolve(40) == 10, method


def test_the_llm_hooks_score_with_the_attention_the_model_computes(qwen3, encoded):
    """The "llm-attention" signal before layer 2 equals the eager attention weights of the text rows over the visual
    tokens, q_norm and k_norm included."""
    prepared, features = encoded
    n = len(prepared.geometry)
    inputs = qwen3.generate_inputs(prepared, features, torch.arange(n))
    seen = {}

    def choose(cut, maps, alive):
        seen.update(maps)
        return torch.arange(n)

    qwen3.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), qwen3.pruning(prepared, [(2, 2)], (LLM_ATTENTION,), choose, True):
            out = qwen3.model(**inputs, use_cache=False, output_attentions=True)
    finally:
        qwen3.model.set_attn_implementation("sdpa")
    ids = prepared.inputs["input_ids"][0]
    visual = (ids == qwen3.image_token_id).nonzero()[:, 0]
    text = torch.arange(int(visual.max()) + 1, len(ids))
    want = out.attentions[2][0][:, text][:, :, visual]  # (H, T, N)
    torch.testing.assert_close(seen[LLM_ATTENTION], want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_every_method_runs_or_says_why_and_meets_its_budget(qwen3, budget):
    image = photo(448, 320, seed=2)
    refused = {m for m in METHODS if unavailable(m, qwen3)}
    assert {"globalcom2", "tome-vit"} <= refused and all(METHODS[m].requires for m in refused)
    for method in sorted(set(METHODS) - refused):
        settings = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}
        result = run(qwen3, image, PROMPT, method, budget, settings=settings, max_new_tokens=1)
        n = len(result.geometry)
        if method == "none" or METHODS[method].adaptive:
            assert len(result.selection.keep) <= n, method
            continue
        want = Budget(fraction=budget).resolve(n)
        assert result.tokens["visual_kept"] == want == len(result.selection.keep), method
    with pytest.raises(ExplorerError, match="thumbnail"):
        run(qwen3, image, PROMPT, "globalcom2", budget, max_new_tokens=1)


def test_the_processor_counts_the_published_rule(qwen3):
    """One token per 32x32 px of the image resized to multiples of 32 (patch 16, 2x2 merge): 1024x768 ->
    32 x 24 = 768; 672x672 -> 21 x 21 = 441; above MAX_PIXELS (1280 tokens) the image is scaled down:
    1920x1080 -> 1504x832 = 47 x 26 = 1222."""
    for (width, height), count in {(1024, 768): 768, (672, 672): 441, (1920, 1080): 1222}.items():
        prepared = qwen3.prepare(photo(width, height), PROMPT)
        assert len(prepared.geometry) == count == int((prepared.inputs["input_ids"] == qwen3.image_token_id).sum())
    assert 1222 <= MAX_PIXELS // 32**2


def test_batches_carry_each_images_deepstack_features(qwen3):
    images = [photo(320, 240, seed=4), photo(256, 256, seed=5)]
    each = []
    for image in images:
        prepared = qwen3.prepare(image, PROMPT)
        with torch.inference_mode():
            features, _ = qwen3.encode(prepared, ())
        each.append(qwen3.generate_inputs(prepared, features, torch.arange(len(prepared.geometry))))
    batch = qwen3.batch_inputs(each)
    stacks = batch["mm_encoder_outputs"]["image"].deepstack_features
    assert len(stacks) == 3 and [len(s) for s in stacks] == [2, 2, 2]
    with torch.inference_mode():
        out = qwen3.model.generate(
            **batch, do_sample=False, max_new_tokens=3, pad_token_id=qwen3.tokenizer.pad_token_id
        )
    alone = [run(qwen3, image, PROMPT, "none", max_new_tokens=3, min_new_tokens=3).answer_ids for image in images]
    length = batch["input_ids"].shape[1]
    assert [row[length:].tolist()[: len(a)] for row, a in zip(out, alone)] == [list(a) for a in alone]


def test_a_full_size_architecture_is_stored(qwen3):
    """Built on the meta device (no memory) from backends/configs/: 28 LLM layers, DeepStack from vision blocks
    5, 11 and 17, the tiny model's image geometry, and as many weights as the analytic cost counts (which
    leaves out biases and norms, well under 0.1% here): 2.13e9."""
    config = backends.stored_config("Qwen/Qwen3-VL-2B-Instruct")
    assert config.model_type == "qwen3_vl" and config.vision_config.deepstack_visual_indexes == [5, 11, 17]
    assert backends.FULL_SIZE["Qwen/Qwen3-VL-2B-Instruct"] == "tiny-qwen3-vl"
    built = backends.full_size("Qwen/Qwen3-VL-2B-Instruct", torch.device("meta"))
    assert type(built) is type(qwen3) and built.depth == 28 and built.stacked == 3
    assert len(built.layout([672, 672])[0]) == len(qwen3.layout([672, 672])[0]) == 441
    count = sum(p.numel() for p in built.model.parameters())
    assert abs(count - 2.13e9) < 0.005e9 and 0 < count - parameters(built.model.config) < 0.001 * count


def test_the_moe_checkpoints_run_on_the_same_code(tmp_path):
    """A tiny qwen3_vl_moe checkpoint (the tiny model's config with 4 experts, 2 a token) loads as Qwen3VLMoe,
    answers as stock generate() and runs a cut inside the LLM."""
    from backends import qwen3_vl, random_models

    config, processor = qwen3_vl.random_parts("tiny-qwen3-vl")
    values = config.to_dict()
    experts = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    moe = transformers.Qwen3VLMoeConfig(
        text_config=values["text_config"] | experts | {"model_type": "qwen3_vl_moe_text"},
        vision_config=values["vision_config"] | {"model_type": "qwen3_vl_moe_vision"},
        **{k: v for k, v in values.items() if k.endswith("_token_id")},
    )
    random_models.save_random("Qwen3VLMoeForConditionalGeneration", moe, processor, tmp_path)
    backend = backends.load(str(tmp_path), "cpu")
    assert type(backend) is backends.BACKENDS["qwen3_vl_moe"]
    image = photo(320, 240, seed=1)
    result = run(backend, image, PROMPT, "none", max_new_tokens=4, min_new_tokens=4)
    prepared = backend.prepare(image, PROMPT)
    with torch.inference_mode():
        out = backend.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    cut = run(backend, image, PROMPT, "fastv", 0.25, settings={"budget_after_cuts": True}, max_new_tokens=2)
    assert cut.tokens["visual_kept"] == Budget(fraction=0.25).resolve(len(prepared.geometry))


def test_the_computed_vision_cost_is_what_torch_counts(qwen3, monkeypatch):
    """The vision FLOPs computed for the encoder, the recomputed maps and the merger with its DeepStack
    mergers (explorer/engine/cost.py) are within 5% of torch's count, with eager attention; a run on the
    tiny model is projected on the stored 2B architecture."""
    from test_vision_cost import counted_run

    qwen3.model.set_attn_implementation("eager")
    try:
        for method in ("none", "cls", "visionzip"):
            result, counted = counted_run(qwen3, photo(400, 300), method, monkeypatch)
            assert abs(result.cost["vision_flops"] - counted) <= 0.05 * counted, (method, counted)
            assert result.cost["projected"]["model"] == "Qwen/Qwen3-VL-2B-Instruct"
    finally:
        qwen3.model.set_attn_implementation("sdpa")
