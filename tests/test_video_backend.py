"""LLaVA-OneVision's video in the backend: a clip through the checkpoint's own video processor, its geometry
(frames as partitions), the signals the image methods read, the prompt with only the kept tokens, and the
cuts inside the LLM; the unreduced answer equals stock generate() on the same frames."""

import functools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_tiles
from mirrors import build
from PIL import Image

import backends
from backends.errors import ExplorerError
from backends.signals import FEATURES, HIDDEN_FEATURE, LLM_ATTENTION, LLM_LOGITS, LLM_POSITIONS, ROWS
from explorer.core import Signals
from explorer.engine.llm import llm_hooks
from explorer.methods import METHODS, make

PROMPT = "What is shown in this image?"
SIZE = (160, 120)  # (width, height) of each frame
MIRROR = "llava-hf--llava-onevision-qwen2-0.5b-ov-hf"


def clip(frames: int = 4, size: tuple[int, int] = SIZE, seed: int = 0) -> list[Image.Image]:
    """Frames that differ: a bright square moving across noise, the noise new in every frame."""
    width, height = size
    out = []
    for f in range(frames):
        pixels = np.random.RandomState(seed + f).randint(0, 128, (height, width, 3), dtype=np.uint8)
        x = f * (width - 30) // max(frames - 1, 1)
        pixels[40:70, x : x + 30] = 255
        out.append(Image.fromarray(pixels))
    return out


@functools.cache
def onevision():
    return backends.load("tiny-llava-onevision", "cpu")


@functools.cache
def prepared(frames: int = 4):
    return onevision().prepare_video(clip(frames), PROMPT)


@functools.cache
def features(frames: int = 4) -> torch.Tensor:
    with torch.inference_mode():
        return onevision().image_features(prepared(frames))  # (N, D)


def greedy(model, inputs: dict, tokens: int = 6) -> list[int]:
    return answer(model, inputs, tokens)[0]


def answer(model, inputs: dict, tokens: int = 6) -> tuple[list[int], torch.Tensor]:
    """The greedy answer's ids and (tokens, B, vocab) logits: a random-weight model's ids hardly depend on
    the clip, its logits do."""
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, -tokens:].tolist(), torch.stack(out.logits)


def stock_inputs(backend, frames: list[Image.Image]) -> dict:
    """The checkpoint's processor on the frames, as its model card calls it, sampling no frames of its own."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = backend.processor.apply_chat_template(conversation, add_generation_prompt=True)
    return backend.processor(videos=[frames], text=text, return_tensors="pt", do_sample_frames=False)


def test_the_unreduced_answer_equals_stock_generate_on_the_same_frames():
    backend, frames = onevision(), clip(4)
    ready, stock = prepared(4), stock_inputs(backend, frames)
    assert torch.equal(ready.inputs["input_ids"], stock["input_ids"])
    assert torch.equal(ready.inputs["pixel_values_videos"], stock["pixel_values_videos"])
    assert stock["pixel_values_videos"].shape == (1, 4, 3, 384, 384)  # exactly these frames, none sampled
    everything = backend.generate_inputs(ready, features(4), torch.arange(len(ready.geometry)))
    (ids, logits), (stock_ids, stock_logits) = answer(backend.model, everything), answer(backend.model, dict(stock))
    assert ids == stock_ids
    torch.testing.assert_close(logits, stock_logits)
    other = answer(backend.model, dict(stock_inputs(backend, clip(4, seed=50))))[1]
    assert (other - stock_logits).abs().max() > 1e-3  # the answer depends on the frames


def test_a_clip_is_frames_of_14x14_pooled_tokens_then_one_newline():
    backend, ready = onevision(), prepared(4)
    g, (width, height) = ready.geometry, SIZE
    assert len(g) == 4 * 196 + 1 == int((ready.inputs["input_ids"] == backend.model.config.video_token_id).sum())
    assert g.names == ("frame 0", "frame 1", "frame 2", "frame 3", "newline") and g.image_size == SIZE
    assert g.sizes() == [196] * 4 + [1] and g.thumbnail is None and g.crops == []
    raster = torch.stack(torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij"), -1).view(-1, 2)
    for f in range(4):
        members = g.members(f)
        assert torch.equal(members, torch.arange(196) + 196 * f) and g.grid(f) == (14, 14)
        assert torch.equal(g.cells[members], raster)  # row by row
        assert_tiles(g.boxes[members], (0, 0, width, height))  # the cells tile the whole frame
        assert torch.equal(g.boxes[members], g.boxes[g.members(0)])  # frames share their layout
    assert g.boxes[-1].isnan().all() and (ready.source == -1).all()  # no token is one encoder patch
    # a pooled cell spans 27/14 patches of 14 px of the 384-px square, the last stretched to the frame's edge
    assert g.boxes[1].tolist() == pytest.approx([27 * width / 384, 0, 54 * width / 384, 27 * height / 384])
    assert not backend.one_patch_each(ready)


@pytest.mark.parametrize("frames,size", [(1, (384, 384)), (7, (500, 300)), (16, (64, 900))])
def test_the_layout_without_the_model_run_counts_what_the_processor_counts(frames, size):
    backend = onevision()
    geometry, source = backend.video_layout(frames, size)
    counted = backend.processor._get_num_multimodal_tokens(video_sizes=[(frames, size[1], size[0])])
    assert len(geometry) == len(source) == counted["num_video_tokens"][0] == frames * 196 + 1
    assert geometry.image_size == size and geometry.boxes[:-1, 2:].amax(0).tolist() == list(size)


def test_a_kept_subset_reaches_the_llm_and_nothing_else():
    backend, ready = onevision(), prepared(4)
    keep = torch.arange(0, len(ready.geometry), 2)  # every other token, the newline (the last, even) included
    inputs = backend.generate_inputs(ready, features(4), keep)
    ids = inputs["input_ids"]
    assert ids.shape[1] == ready.text_tokens + len(keep)
    assert int((ids == backend.model.config.video_token_id).sum()) == len(keep) == 393
    assert len(greedy(backend.model, inputs, 3)) == 3
    # the model puts the kept features at the kept tokens' places: the embeddings the LLM gets
    with torch.inference_mode():
        embeds = backend.model.model.get_input_embeddings()(ids)  # (1, L', D)
        seen = {}
        handle = backend.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
        )
        try:
            backend.model(**inputs)
        finally:
            handle.remove()
    video = ids[0] == backend.model.config.video_token_id
    torch.testing.assert_close(seen["embeds"][0, video], features(4)[keep])
    torch.testing.assert_close(seen["embeds"][0, ~video], embeds[0, ~video])


def test_two_clips_in_one_batch_answer_as_each_alone():
    backend = onevision()
    ready = [prepared(4), backend.prepare_video(clip(4, seed=50), PROMPT)]
    keep = torch.arange(0, 785, 3)
    with torch.inference_mode():
        each = [backend.generate_inputs(p, backend.image_features(p), keep) for p in ready]
    alone = [answer(backend.model, inputs, 3)[1][:, 0] for inputs in each]  # (3, vocab) each
    together = answer(backend.model, backend.batch_inputs(each), 3)[1]  # (3, 2, vocab)
    torch.testing.assert_close(together, torch.stack(alone, 1))
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the clips answer differently, so their order shows


def vision_methods() -> list[str]:
    """Every vision-stage method with a budget that an image of OneVision runs and whose signals a clip can
    give: not those that need a thumbnail or merge inside the encoder (one patch a token)."""
    return [
        name
        for name, method in METHODS.items()
        if method.stage == "vision" and not method.requires and make(name).merging is None and make(name).budgeted
    ]


def test_encode_gives_every_signal_the_image_methods_read_as_the_model_pools_them():
    backend, ready = onevision(), prepared(4)
    n = len(ready.geometry)
    methods = [make(name) for name in vision_methods()] + [make(name) for name in ("mustdrop", "aim")]
    needs = tuple(sorted({s for m in methods for s in (m.needs if m.stage == "vision" else m.vision_needs)}))
    assert {"cls@feature", "keys@feature", HIDDEN_FEATURE, FEATURES, "cls-onehead@last"} <= set(needs)
    with torch.inference_mode():
        projected, signals = backend.encode(ready, needs)
        _, unprojected = backend.encode(ready, needs, project=False)
        tower = backend.model.model.vision_tower(ready.inputs["pixel_values_videos"][0], output_hidden_states=True)
    torch.testing.assert_close(projected, features(4))
    assert projected.shape[0] == n and signals[FEATURES] is projected
    for name, values in signals.items():
        assert values.shape[0] == n, name
        if name != FEATURES:
            assert values[-1].isnan().all() and not values[:-1].isnan().any(), name  # the newline has none
            torch.testing.assert_close(unprojected[name], values, equal_nan=True)
    hidden = tower.hidden_states[backend.model.config.vision_feature_layer]  # (F, 729, C): what the projector takes
    pooled = backend.model.model.apply_pooling(hidden).flatten(0, 1)  # (F * 196, C), the model's own pooling
    torch.testing.assert_close(signals[HIDDEN_FEATURE][:-1], pooled)
    with pytest.raises(ExplorerError, match="several encoder patches"):
        backend.encode(ready, (ROWS,))


@pytest.mark.parametrize("name", vision_methods())
def test_every_image_method_keeps_its_budget_of_a_clip(name):
    backend, ready = onevision(), prepared(4)
    method, n = make(name), len(ready.geometry)
    with torch.inference_mode():
        _, signals = backend.encode(ready, method.needs)
        for budget in (1, n // 10, n // 2):
            if method.early_layer is not None:  # GemFilter: a first pass through the LLM on the clip
                signals |= backend.early_pass(ready, signals[FEATURES], method.early_layer(backend.depth))
            selection = method.select(Signals(ready.geometry, budget, signals))
            kept = len(selection.keep)
            assert (kept <= budget if method.adaptive else kept == budget) and (selection.keep.diff() > 0).all()
    inputs = backend.generate_inputs(ready, features(4), selection.keep)
    assert inputs["input_ids"].shape[1] == ready.text_tokens + len(selection.keep)


def test_the_llm_stage_cuts_the_video_tokens_of_the_prompt():
    backend, ready = onevision(), prepared(4)
    video = (ready.inputs["input_ids"][0] == backend.model.config.video_token_id).nonzero()[:, 0]  # (N,)
    with torch.inference_mode():
        early = backend.early_pass(ready, features(4), 1)
    assert (
        torch.equal(early[LLM_POSITIONS], video) and early[LLM_LOGITS].shape[-1] == ready.inputs["input_ids"].shape[1]
    )
    seen: dict[str, torch.Tensor] = {}

    def choose(cut, maps, alive):  # keep every other visual token, reading where the hooks found them
        seen.update(maps)
        return alive.nonzero()[::2, 0]

    lengths = []  # the sequence layer 2 computes with, after the cut's hook
    layer = backend.language_model.layers[2]
    everything = backend.generate_inputs(ready, features(4), torch.arange(len(ready.geometry)))
    with backend.pruning(ready, [(2, 2)], (LLM_ATTENTION, LLM_POSITIONS), choose, False) as record:
        handle = layer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
        try:
            greedy(backend.model, everything, 3)
        finally:
            handle.remove()
    assert torch.equal(seen[LLM_POSITIONS], video) and seen[LLM_ATTENTION].shape[-1] == len(video)
    assert len(record.keeps[0]) == 393 and lengths[0] == ready.inputs["input_ids"].shape[1] - (len(video) - 393)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart"])
def test_llm_stage_methods_run_on_a_clip(name):
    backend, ready = onevision(), prepared(4)
    method, n = make(name), len(ready.geometry)
    stage, hooks = llm_hooks(backend, ready, name, method, 3 * n // 5)
    with hooks:
        greedy(backend.model, backend.generate_inputs(ready, features(4), torch.arange(n)), 2)
    tokens = stage.tokens()
    assert tokens["visual_entering"] == n and stage.done
    assert math.isclose(tokens["visual_layer_mean"], 3 * n // 5, abs_tol=1), tokens


def test_families_without_video_say_so(backend):
    with pytest.raises(ExplorerError, match="LLaVA-NeXT takes no video here yet"):
        backend.prepare_video(clip(2), PROMPT)


def test_bad_clips_get_a_clear_message():
    backend = onevision()
    with pytest.raises(ExplorerError, match="at least one frame"):
        backend.prepare_video([], PROMPT)
    with pytest.raises(ExplorerError, match="one size"):
        backend.prepare_video(clip(1, (160, 120)) + clip(1, (120, 160)), PROMPT)
    with pytest.raises(ExplorerError, match="3 frame times for 2 frames"):
        backend.prepare_video(clip(2), PROMPT, times_s=[0.0, 1.0, 2.0])


def test_the_published_checkpoint_runs_a_clip_through_its_published_video_processor():
    """llava-onevision-qwen2-0.5b-ov-hf as published: transformers builds its video processor from the
    checkpoint's files, with the settings of its video_processor/preprocessor_config.json (SigLIP's mean
    and std, not the class's CLIP defaults), and the answer on a clip equals stock generate()."""
    with tempfile.TemporaryDirectory() as folder:
        path = build.build(MIRROR, Path(folder) / MIRROR)
        backend = backends.load(str(path), "cpu")
        published = json.loads((build.MIRRORS / MIRROR / "video_processor" / "preprocessor_config.json").read_text())
        video = backend.processor.video_processor
        assert type(video).__name__ == published["image_processor_type"]
        assert list(video.image_mean) == published["image_mean"] and list(video.image_std) == published["image_std"]
        assert (video.size.height, video.size.width, video.resample) == (384, 384, published["resample"])
        frames = clip(3, (200, 150))
        ready = backend.prepare_video(frames, PROMPT)
        assert len(ready.geometry) == 3 * 196 + 1
        with torch.inference_mode():
            mine = backend.generate_inputs(ready, backend.image_features(ready), torch.arange(3 * 196 + 1))
        stock = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        (ids, logits), (stock_ids, stock_logits) = (
            answer(backend.model, mine, 4),
            answer(stock, stock_inputs(backend, frames), 4),
        )
        assert ids == stock_ids
        torch.testing.assert_close(logits, stock_logits)


def test_llava_video_runs_a_clip_as_stock_generate_does():
    """llava-hf/LLaVA-Video-7B-Qwen2-hf (a LLaVA-OneVision checkpoint: its mirror's SOURCES.md) loads by its folder,
    with its conversion's chat template, and its unreduced answer on a clip equals stock generate()."""
    name = "llava-hf--LLaVA-Video-7B-Qwen2-hf"
    with tempfile.TemporaryDirectory() as folder:
        path = build.build(name, Path(folder) / name)
        backend = backends.load(str(path), "cpu")
        assert type(backend).__name__ == "LlavaOnevision" and not backend.random_weights
        assert type(backend.processor.video_processor).__name__ == "LlavaOnevisionVideoProcessor"
        frames = clip(3, (200, 150))
        ready = backend.prepare_video(frames, PROMPT)
        assert (
            backend.chat(PROMPT, part="video")
            == f"<|im_start|>user\n<video>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert len(ready.geometry) == 3 * 196 + 1 and ready.geometry.frames == [0, 1, 2]
        with torch.inference_mode():
            mine = backend.generate_inputs(ready, backend.image_features(ready), torch.arange(3 * 196 + 1))
        stock = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        (ids, logits), (stock_ids, stock_logits) = (
            answer(backend.model, mine, 4),
            answer(stock, stock_inputs(backend, frames), 4),
        )
        assert ids == stock_ids
        torch.testing.assert_close(logits, stock_logits)
