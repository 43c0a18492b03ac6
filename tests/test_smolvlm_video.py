"""SmolVLM2 video: a clip through the checkpoint's own video processor (SmolVLMVideoProcessor), each frame one
tile of image tokens after its time in the prompt, the frames as partitions; the unreduced answer equals stock
generate() on the same frames, on the tiny model and on the published SmolVLM2-256M-Video-Instruct (its
mirror); every budget is met exactly and the per-frame counts add up."""

from dataclasses import replace

import pytest
import torch
import transformers
from conftest import assert_tiles
from mirrors import build
from test_video import write
from test_video_backend import answer
from transformers.video_utils import VideoMetadata

import backends
from backends.signals import FEATURES, HIDDEN_FEATURE
from explorer import run
from explorer.core import fraction_of
from explorer.engine.video import load_video

PROMPT = "What happens in this video?"
MIRROR = "HuggingFaceTB--SmolVLM2-256M-Video-Instruct"
TOTAL, RATE = 30, 10  # the test video: 30 frames at 10 fps (test_video.write), 64x32 px


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4", "mpeg4", count=TOTAL)


@pytest.fixture(scope="module")
def clip(video):
    return load_video(video, frames=4)  # frames 0, 7, 15, 22: at 0, 0.7, 1.5 and 2.2 s of 3 s


@pytest.fixture(scope="module")
def tiny():
    return backends.load("tiny-smolvlm", "cpu")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    return build.build(MIRROR, tmp_path_factory.mktemp("mirror") / MIRROR)


@pytest.fixture(scope="module")
def published(mirror):
    return backends.load(str(mirror), "cpu")


def stock_inputs(backend, clip) -> dict:
    """The checkpoint's processor on the clip's frames with the metadata transformers' own PyAV reader gives
    the video (its frame count and rate, the sampled frames' indices), sampling no frames of its own."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = backend.processor.apply_chat_template(conversation, add_generation_prompt=True)
    width, height = clip.size
    metadata = VideoMetadata(TOTAL, RATE, width, height, TOTAL / RATE, frames_indices=clip.indices)
    return backend.processor(
        videos=[clip.frames], text=text, return_tensors="pt", do_sample_frames=False, video_metadata=[metadata]
    )


def check_against_stock(backend, stock_model, clip) -> None:
    ours = run(backend, clip, PROMPT, "none", max_new_tokens=5, min_new_tokens=5)
    stock = stock_inputs(backend, clip)
    stock_ids, stock_logits = answer(stock_model, dict(stock), 5)
    assert list(ours.answer_ids) == stock_ids
    ready = backend.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    for key in ("input_ids", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(ready.inputs[key], stock[key]), key
    text = backend.tokenizer.decode(ready.inputs["input_ids"][0])
    assert "the following series of four frames from a 0:00:03 [H:MM:SS] video" in text
    stamps = [part.split(":<", 1)[0] for part in text.split("Frame from ")[1:]]
    assert stamps == ["00:00", "00:00", "00:01", "00:02"]  # 0, 0.7, 1.5 and 2.2 s, as stock writes them
    with torch.inference_mode():
        everything = backend.generate_inputs(ready, backend.image_features(ready), torch.arange(len(ready.geometry)))
    ids, logits = answer(backend.model, everything, 5)
    assert ids == stock_ids
    torch.testing.assert_close(logits, stock_logits)


def test_the_unreduced_answer_equals_stock_generate_on_the_same_frames(tiny, clip):
    check_against_stock(tiny, tiny.model, clip)
    logits = answer(tiny.model, dict(stock_inputs(tiny, clip)), 3)[1]
    backwards = answer(tiny.model, dict(stock_inputs(tiny, replace(clip, frames=clip.frames[::-1]))), 3)[1]
    assert (backwards - logits).abs().max() > 1e-4  # the answer depends on the frames


def test_bare_frames_are_taken_at_24_fps_as_stock_takes_them(tiny, clip):
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = tiny.processor.apply_chat_template(conversation, add_generation_prompt=True)
    stock = tiny.processor(videos=[clip.frames], text=text, return_tensors="pt", do_sample_frames=False)
    ready = tiny.prepare_video(clip.frames, PROMPT)
    assert torch.equal(ready.inputs["input_ids"], stock["input_ids"])
    assert "four frames from a 0:00:00 [H:MM:SS] video" in tiny.tokenizer.decode(ready.inputs["input_ids"][0])


@pytest.mark.parametrize("count", [4, 1])
def test_each_frame_is_one_tile_of_tokens_over_the_whole_frame(tiny, clip, count):
    ready = tiny.prepare_video(clip.frames[:count], PROMPT, clip.times_s[:count], clip.duration_s)
    g, (width, height) = ready.geometry, clip.size
    assert len(g) == count * 64 == int((ready.inputs["input_ids"] == tiny.image_token_id).sum())
    assert tiny.visual_token_id(ready) == tiny.image_token_id and ready.video and (ready.source == -1).all()
    assert g.names == tuple(f"frame {f}" for f in range(count)) and g.frames == list(range(count))
    assert g.sizes() == [64] * count and g.image_size == clip.size and g.thumbnail is None and g.crops == []
    raster = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).view(-1, 2)
    image, _ = tiny.layout([height, width])
    for f in range(count):
        members = g.members(f)
        assert torch.equal(members, torch.arange(64) + 64 * f) and g.grid(f) == (8, 8)
        assert torch.equal(g.cells[members], raster)  # row by row, as the pixel shuffle reads them
        assert_tiles(g.boxes[members], (0, 0, width, height))
        assert torch.equal(g.boxes[members], image.boxes[image.members(image.thumbnail)])  # as an image's global tile
    assert ready.inputs["pixel_values"].shape == (1, count, 3, 512, 512)  # one tile a frame, never split
    assert tiny.encoder_sequences(ready) == [32 * 32] * count


def test_the_signals_of_a_clip_line_up_with_its_tokens(tiny, clip):
    ready = tiny.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    with torch.inference_mode():
        features, signals = tiny.encode(ready, (FEATURES, HIDDEN_FEATURE, "cls@last", "keys@feature"))
        torch.testing.assert_close(tiny.project(signals[HIDDEN_FEATURE]), features)
    assert all(value.shape[0] == len(ready.geometry) == 256 for value in signals.values())
    assert not signals["cls@last"].isnan().any()


@pytest.mark.parametrize("method", ["frames", "random", "uniform", "cls", "divprune", "visionzip"])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_every_budget_is_met_on_a_clip_and_by_frame_adds_up(tiny, clip, method, budget):
    result = run(tiny, clip, PROMPT, method, budget, max_new_tokens=1)
    t, n = result.tokens, 4 * 64
    assert t["visual_full"] == n and t["visual_kept"] == fraction_of(budget, n) == len(result.selection.keep)
    frames = t["by_frame"]
    assert [f["frames"] for f in frames] == [[i] for i in clip.indices]
    assert [f["time_s"] for f in frames] == clip.times_s
    assert sum(f["full"] for f in frames) == n and sum(f["kept"] for f in frames) == t["visual_kept"]
    if method == "frames":  # whole frames, the rest from one more
        assert sorted(f["kept"] for f in frames)[-1] == 64 or t["visual_kept"] < 64
    else:  # an image method on each frame, each its share
        assert sorted(f["kept"] for f in frames)[-1] - sorted(f["kept"] for f in frames)[0] <= 1


def test_the_published_checkpoint_answers_a_clip_as_stock_does(published, mirror, clip):
    video = published.processor.video_processor
    assert type(video).__name__ == "SmolVLMVideoProcessor"
    assert (video.max_image_size["longest_edge"], video.fps, video.num_frames) == (512, 1, 64)
    stock = transformers.SmolVLMForConditionalGeneration.from_pretrained(mirror, dtype=torch.float32)
    check_against_stock(published, stock, clip)


@pytest.mark.parametrize("method", ["frames", "cls"])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_the_published_checkpoint_meets_every_budget_on_a_clip(published, clip, method, budget):
    result = run(published, clip, PROMPT, method, budget, max_new_tokens=1)
    t, n = result.tokens, 4 * 64  # 512-px tiles of 16-px patches folded 4x4: 64 tokens a frame
    assert t["visual_full"] == n and t["visual_kept"] == fraction_of(budget, n) == len(result.selection.keep)
    assert sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"]
