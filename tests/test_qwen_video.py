"""Qwen2-VL and Qwen2.5-VL video: a clip through the checkpoint's own video processor (Qwen2VLVideoProcessor),
temporal groups of 2 frames as partitions, M-RoPE positions as stock computes them (Qwen2.5-VL's absolute
time included), kept tokens at their unreduced positions; the unreduced answer equals stock generate()."""

import functools

import pytest
import torch
from conftest import assert_tiles
from PIL import Image
from test_video import write
from test_video_backend import answer
from test_video_backend import clip as drawn
from transformers.video_utils import VideoMetadata

import backends
from backends.signals import FEATURES, HIDDEN_FEATURE
from explorer import run
from explorer.core import fraction_of
from explorer.engine.video import Clip, load_video

PROMPT = "What happens in this video?"
SIZE = (160, 120)  # (width, height) of each frame
MODELS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
STEP = 5  # a clip of F frames: every 5th frame of a 10-fps video of 5F frames, as a uniform sampler spreads them


@functools.cache
def model(name: str):
    return backends.load(name, "cpu")


def frames(count: int, seed: int = 0) -> list[Image.Image]:
    """Frames that differ (as test_video_backend draws them): a bright square moving across noise."""
    return drawn(count, SIZE, seed)


def clip(count: int, seed: int = 0) -> Clip:
    indices = [STEP * i for i in range(count)]
    return Clip(frames(count, seed=seed), indices, [i / 10 for i in indices], 10.0, STEP * count / 10, False)


def stock_inputs(backend, c: Clip) -> dict:
    """The checkpoint's processor on the clip's frames, as transformers calls it on the frames it decoded
    itself: the video's frame rate and length and the sampled frames' indices (Qwen2.5-VL's processor makes
    `second_per_grid_ts` of them: 2 / sampled fps, F / (5F) * 10 = 2 fps), no frames sampled of its own."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = backend.processor.apply_chat_template(conversation, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=STEP * len(c.frames), fps=c.fps, frames_indices=c.indices)
    return backend.processor(
        videos=[c.frames], text=text, return_tensors="pt", do_sample_frames=False, video_metadata=[metadata]
    )


def greedy(backend, inputs: dict, tokens: int = 5) -> tuple[list[int], torch.Tensor]:
    """The greedy answer's ids and logits (test_video_backend's `answer`)."""
    return answer(backend.model, inputs, tokens)


@pytest.mark.parametrize("count", [4, 3])
@pytest.mark.parametrize("name", MODELS)
def test_the_unreduced_answer_equals_stock_generate_on_the_same_frames(name, count):
    backend, c = model(name), clip(count)
    stock = stock_inputs(backend, c)
    ours = run(backend, c, PROMPT, "none", max_new_tokens=5, min_new_tokens=5)
    stock_ids, stock_logits = greedy(backend, dict(stock))
    assert list(ours.answer_ids) == stock_ids
    ready = backend.prepare_video(c.frames, PROMPT, c.times_s)
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw", *(["second_per_grid_ts"] * ("2.5" in name))):
        assert torch.equal(ready.inputs[key], stock[key]), key
    n = len(ready.geometry)
    with torch.inference_mode():
        everything = backend.generate_inputs(ready, backend.image_features(ready), torch.arange(n))
    ids, logits = greedy(backend, everything)
    assert ids == stock_ids
    torch.testing.assert_close(logits, stock_logits)
    stock_positions, _ = backend.model.model.get_rope_index(**{k: v for k, v in stock.items() if "pixel" not in k})
    assert torch.equal(everything["position_ids"][1:], stock_positions)  # M-RoPE as stock computes it
    video = stock["input_ids"][0] == backend.model.config.video_token_id
    times = stock_positions[0, 0, video].unique()
    if "2.5" in name:  # absolute time: 2 tokens a second (the 3B's), a group spans 1 s (2 frames at 2 fps)
        assert (times.diff() == 2).all() and float(stock["second_per_grid_ts"][0]) == 1.0
    else:  # one step per temporal group
        assert (times.diff() == 1).all()
    assert len(times) == (count + 1) // 2
    other = greedy(backend, dict(stock_inputs(backend, clip(count, seed=50))))[1]
    assert (other - stock_logits).abs().max() > 1e-4  # the answer depends on the frames


@pytest.mark.parametrize("name", MODELS)
def test_an_odd_clip_is_padded_with_its_last_frame_and_the_geometry_follows(name):
    backend, c = model(name), clip(3)
    ready = backend.prepare_video(c.frames, PROMPT, c.times_s)
    padded = backend.processor.video_processor(videos=[c.frames + c.frames[-1:]], return_tensors="pt")
    assert torch.equal(ready.inputs["pixel_values_videos"], padded["pixel_values_videos"])  # the last one, twice
    assert ready.inputs["video_grid_thw"].tolist() == [[2, 8, 12]]
    assert ready.geometry.names == ("frames 0-1", "frame 2") and ready.geometry.sizes() == [24, 24]


@pytest.mark.parametrize("count", [4, 3, 1, 7])
@pytest.mark.parametrize("name", MODELS)
def test_the_geometry_counts_the_processor_s_video_tokens_in_temporal_groups(name, count):
    backend, (width, height) = model(name), SIZE
    ready = backend.prepare_video(frames(count), PROMPT)
    g = ready.geometry
    groups = (count + 1) // 2
    counted = backend.processor._get_num_multimodal_tokens(video_sizes=[(count, height, width)])
    assert len(g) == int((ready.inputs["input_ids"] == backend.model.config.video_token_id).sum()) == groups * 24
    assert len(g) == counted["num_video_tokens"][0] and ready.video and (ready.source == -1).all()
    names = [f"frames {2 * i}-{2 * i + 1}" for i in range(count // 2)] + [f"frame {count - 1}"] * (count % 2)
    assert g.names == tuple(names) and g.image_size == SIZE and g.sizes() == [24] * groups
    raster = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij"), -1).view(-1, 2)
    image, _ = backend.layout([height, width])  # the image path's layout of one frame
    for p in range(groups):
        members = g.members(p)
        assert torch.equal(members, torch.arange(24) + 24 * p) and g.grid(p) == (4, 6)
        assert torch.equal(g.cells[members], raster)  # the merged 2x2 blocks, row by row
        assert torch.equal(g.boxes[members], image.boxes)  # boxes on the frame as on an image of its size
        assert_tiles(g.boxes[members], (0, 0, width, height))
    assert backend.encoder_sequences(ready) == [8 * 12] * groups  # the cost model's: each group alone


@pytest.mark.parametrize("method", ["cls", "frames", "random"])
@pytest.mark.parametrize("name", MODELS)
def test_a_reduced_run_keeps_its_budget_at_the_unreduced_positions(name, method):
    backend, c = model(name), clip(4)
    ready = backend.prepare_video(c.frames, PROMPT, c.times_s)
    n = len(ready.geometry)
    seen = []
    hook = backend.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape[1], kwargs["position_ids"])),
        with_kwargs=True,
    )
    try:
        result = run(backend, c, PROMPT, method, 0.25, max_new_tokens=1)
    finally:
        hook.remove()
    keep, kept = result.selection.keep, fraction_of(0.25, n)
    assert result.tokens["visual_full"] == n and result.tokens["visual_kept"] == kept == len(keep) == n // 4
    length, positions = seen[0]  # the prefill
    assert length == ready.text_tokens + kept  # the LLM sees exactly the kept visual tokens
    full = backend.positions(ready)  # (3, 1, L) unreduced
    assert torch.equal(positions[-3:], full[..., backend.staying(ready, keep)])
    video = (ready.inputs["input_ids"][0] == backend.model.config.video_token_id).nonzero()[:, 0]
    start = int(video[0])
    assert torch.equal(positions[-3:, 0, start : start + kept], full[:, 0, video[keep]])
    frames_ = result.tokens["by_frame"]
    assert [f["frames"] for f in frames_] == [[0, 5], [10, 15]] and [f["time_s"] for f in frames_] == [0.0, 1.0]
    assert sum(f["full"] for f in frames_) == n and sum(f["kept"] for f in frames_) == kept
    if method == "frames":  # whole groups: the budget (12) is half of one group's 24
        assert sorted(f["kept"] for f in frames_) == [0, 12]
    else:  # image methods per group, each its share
        assert [f["kept"] for f in frames_] == [6, 6]


@pytest.mark.parametrize("name", MODELS)
def test_two_clips_in_one_batch_answer_as_each_alone(name):
    backend = model(name)
    ready = [backend.prepare_video(clip(4, seed=s).frames, PROMPT, clip(4).times_s) for s in (0, 50)]
    keeps = [torch.arange(0, 48, 3), torch.arange(1, 48, 2)]  # different counts, so the padding shows
    with torch.inference_mode():
        each = [backend.generate_inputs(p, backend.image_features(p), k) for p, k in zip(ready, keeps)]
    alone = [greedy(backend, inputs, 3)[1][:, 0] for inputs in each]  # (3, vocab) each
    together = greedy(backend, backend.batch_inputs(each), 3)[1]  # (3, 2, vocab)
    torch.testing.assert_close(together, torch.stack(alone, 1))


@pytest.mark.parametrize("name", MODELS)
def test_the_signals_of_a_clip_line_up_with_its_tokens(name):
    """The image methods read a clip's signals as an image's: one row per token, in LLM order; the encoder
    outputs of each token's 4 tubes (put back in image order from Qwen2.5-VL's windows) through the model's
    merger are its features."""
    backend = model(name)
    ready = backend.prepare_video(frames(4), PROMPT)
    with torch.inference_mode():
        features, signals = backend.encode(ready, (FEATURES, HIDDEN_FEATURE, "cls@last", "keys@feature"))
        torch.testing.assert_close(backend.project(signals[HIDDEN_FEATURE]), features)
    assert all(value.shape[0] == len(ready.geometry) == 48 for value in signals.values())
    assert not signals["cls@last"].isnan().any() and (signals["cls@last"] > 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_unevenly_spaced_frames_get_the_time_positions_stock_gives(name, tmp_path):
    """2.4 fps of a 30-frame 10-fps video: int(30 / 10 * 2.4) = 7 frames, at arange(7) * 30 // 7, unevenly
    spaced. Stock (transformers' reader's metadata, then the processor) takes their rate as 7 frames in 3 s,
    so a Qwen2.5-VL group of 2 frames spans 2 / (7 / 3) = 6/7 s; the first-to-last spacing (6 in 2.5 s) would
    say 5/6 s."""
    c = load_video(write(tmp_path / "clip.mp4", "mpeg4", count=30), fps=2.4)
    assert c.indices == [0, 4, 8, 12, 17, 21, 25] and c.duration_s == pytest.approx(3.0)
    backend = model(name)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = backend.processor.apply_chat_template(conversation, add_generation_prompt=True)
    metadata = VideoMetadata(30, 10.0, *c.size, duration=3.0, frames_indices=c.indices)
    stock = backend.processor(
        videos=[c.frames], text=text, return_tensors="pt", do_sample_frames=False, video_metadata=[metadata]
    )
    ready = backend.prepare_video(c.frames, PROMPT, c.times_s, c.duration_s)
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw", *(["second_per_grid_ts"] * ("2.5" in name))):
        torch.testing.assert_close(ready.inputs[key], stock[key], rtol=0, atol=1e-6, msg=key)
    if "2.5" in name:
        assert float(stock["second_per_grid_ts"][0]) == pytest.approx(6 / 7)
    stock_positions, _ = backend.model.model.get_rope_index(**{k: v for k, v in stock.items() if "pixel" not in k})
    assert torch.equal(backend.positions(ready), stock_positions)
    ours = run(backend, c, PROMPT, "none", max_new_tokens=3, min_new_tokens=3)
    assert list(ours.answer_ids) == greedy(backend, dict(stock), 3)[0]
