"""InternVL3 video (backends/internvl.py `prepare_video`): a clip through the checkpoint's own video processor
(InternVLVideoProcessor), each frame one 448-px tile of 256 `<IMG_CONTEXT>` tokens after "FrameN: <img>", the
frames as partitions; the unreduced answer equals stock generate() on the same frames, on the tiny model and on
the published InternVL3-1B-hf (its mirror, with its reconstructed video processor); the prompt and each frame's
pixels are OpenGVLab's video evaluation code's; the token counts are the stock processor's; every box covers
the pixels its token saw; image methods run per frame and the LLM gets the shorter sequence; the video methods
run; the CLI runs a clip."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_tiles, photo
from mirrors import build
from PIL import Image
from test_freevideollm import clip_model  # noqa: F401 (a fixture: a tiny CLIP model)
from test_video import write
from test_video_backend import answer

import backends
from backends.signals import FEATURES, HIDDEN_FEATURE
from explorer import run
from explorer.cli import main
from explorer.core import fraction_of
from explorer.engine.video import load_video

PROMPT = "What happens in this video?"
MIRROR = "OpenGVLab--InternVL3-1B-hf"
TOKENS = 256  # a 448-px tile: 32x32 patches of 14 px, folded 2x2 by the pixel shuffle


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4", "mpeg4", count=30)  # 30 frames at 10 fps, 64x32


@pytest.fixture(scope="module")
def clip(video):
    return load_video(video, frames=4)  # frames 0, 7, 15, 22


@pytest.fixture(scope="module")
def tiny():
    return backends.load("tiny-internvl3", "cpu")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    return build.build(MIRROR, tmp_path_factory.mktemp("mirror") / MIRROR)


def stock_inputs(backend, frames: list) -> dict:
    """The checkpoint's chat template and processor on the frames, sampling none of its own."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = backend.processor.apply_chat_template(conversation, add_generation_prompt=True)
    return dict(backend.processor(videos=[frames], text=text, return_tensors="pt", do_sample_frames=False))


def check_against_stock(backend, stock_model, clip) -> None:
    ours = run(backend, clip, PROMPT, "none", max_new_tokens=5, min_new_tokens=5)
    stock = stock_inputs(backend, clip.frames)
    stock_ids, stock_logits = answer(stock_model, stock, 5)
    assert list(ours.answer_ids) == stock_ids
    assert ours.tokens["visual_full"] == ours.tokens["visual_kept"] == 4 * TOKENS
    ready = backend.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(ready.inputs[key], stock[key]), key
    assert ready.inputs["pixel_values"].shape == (4, 3, 448, 448)  # one tile a frame, no thumbnail
    # the official prompt (OpenGVLab/InternVL @2410d1d, internvl_chat/eval/mvbench/evaluate_mvbench.py L190-193:
    # "Frame{i}: <image>" lines joined by newlines, a newline, the question; internvl_chat/internvl/model/
    # internvl_chat/modeling_internvl_chat.py L374-375: each <image> becomes <img>, 256 <IMG_CONTEXT>, </img>)
    text = backend.tokenizer.decode(ready.inputs["input_ids"][0]).replace("<IMG_CONTEXT>" * TOKENS, "*")
    frames = "\n".join(f"Frame{i}: <img>*</img>" for i in range(1, 5))
    assert f"<|im_start|>user\n{frames}\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n" in text
    with torch.inference_mode():
        everything = backend.generate_inputs(ready, backend.image_features(ready), torch.arange(len(ready.geometry)))
    ids, logits = answer(backend.model, everything, 5)
    assert ids == stock_ids
    torch.testing.assert_close(logits, stock_logits)


def test_the_unreduced_answer_equals_stock_generate_on_the_same_frames(tiny, clip):
    check_against_stock(tiny, tiny.model, clip)
    logits = answer(tiny.model, stock_inputs(tiny, clip.frames), 3)[1]
    backwards = answer(tiny.model, stock_inputs(tiny, clip.frames[::-1]), 3)[1]
    assert (backwards - logits).abs().max() > 1e-4  # the answer depends on the frames and their order


def test_the_published_checkpoint_answers_a_clip_as_stock_does(mirror, clip):
    """The mirror's reconstructed video_preprocessor_config.json is the video processor transformers builds from
    preprocessor_config.json without it (as the conversion script did), and the answer is stock's."""
    published = backends.load(str(mirror), "cpu")
    video = published.processor.video_processor
    assert type(video).__name__ == "InternVLVideoProcessor" and not video.do_sample_frames
    assert (video.size.height, video.size.width, video.resample) == (448, 448, 3)
    (mirror / "video_preprocessor_config.json").rename(mirror / "aside.json")
    try:
        fallback = transformers.AutoProcessor.from_pretrained(mirror).video_processor
    finally:
        (mirror / "aside.json").rename(mirror / "video_preprocessor_config.json")
    keys = ("size", "resample", "image_mean", "image_std", "do_resize", "do_rescale", "rescale_factor", "do_normalize")
    assert {k: getattr(video, k) for k in keys} == {k: getattr(fallback, k) for k in keys}
    stock = transformers.InternVLForConditionalGeneration.from_pretrained(mirror, dtype=torch.float32)
    check_against_stock(published, stock, clip)


def test_each_frame_is_the_official_codes_one_tile(tiny):
    """As OpenGVLab's video evaluation makes a frame (evaluate_mvbench.py L205: one patch, the frame itself,
    without dynamic tiling; internvl_chat/internvl/train/dataset.py L297-299, `build_transform`: resized to
    448x448, bicubic, ImageNet's mean and std), re-derived here with torchvision's PIL transforms: the stock
    video processor resizes tensors, so the pixels agree to about a level of 255."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    frames = [photo(200, 120, seed=f) for f in range(2)]
    official = transforms.Compose(
        [
            transforms.Resize((448, 448), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    want = torch.stack([official(frame) for frame in frames])  # (F, 3, 448, 448)
    gap = (tiny.prepare_video(frames, PROMPT).inputs["pixel_values"] - want).abs()
    assert gap.max() < 3 / 255 / 0.224 and gap.mean() < 1e-3


@pytest.mark.parametrize("count", [4, 2])
def test_the_visual_tokens_are_the_stock_processors(tiny, clip, count):
    frames = clip.frames[:count]
    stock = stock_inputs(tiny, frames)
    ready = tiny.prepare_video(frames, PROMPT, clip.times_s[:count], clip.duration_s)
    assert len(ready.geometry) == int((stock["input_ids"] == tiny.image_token_id).sum()) == count * TOKENS
    assert ready.text_tokens == stock["input_ids"].shape[1] - count * TOKENS
    assert tiny.encoder_sequences(ready) == [32 * 32] * count


def test_each_frame_is_one_partition_of_a_tile_over_the_whole_frame(tiny, clip):
    ready = tiny.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    g, (width, height) = ready.geometry, clip.size
    assert tiny.visual_token_id(ready) == tiny.image_token_id and ready.video and (ready.source == -1).all()
    assert g.names == tuple(f"frame {f}" for f in range(4)) and g.frames == list(range(4))
    assert g.sizes() == [TOKENS] * 4 and g.image_size == clip.size and g.thumbnail is None and g.crops == []
    for f in range(4):
        members = g.members(f)
        assert torch.equal(members, torch.arange(TOKENS) + TOKENS * f) and g.grid(f) == (16, 16)
        cells = g.cells[members]
        assert torch.equal(cells[:, 0] * 16 + cells[:, 1], torch.arange(TOKENS))  # row by row
        assert_tiles(g.boxes[members], (0, 0, width, height))


def test_every_box_covers_the_pixels_its_token_saw(tiny):
    """On frames whose colour encodes the position (red = x, green = y), each token's 2x2 patches (28x28 pixels
    of its frame's tile) average to a point inside its box, in every frame."""
    width, height = 300, 120
    x, y = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)
    pixels = np.stack([x * 255, y * 255, np.zeros_like(x)], -1).round().astype(np.uint8)
    ready = tiny.prepare_video([Image.fromarray(pixels)] * 2, "hi")
    video = tiny.processor.video_processor
    mean, std = torch.tensor(video.image_mean), torch.tensor(video.image_std)
    values = ready.inputs["pixel_values"].view(-1, 3, 16, 28, 16, 28).mean((3, 5))  # (frames, 3, 16, 16)
    colour = values.permute(0, 2, 3, 1).reshape(-1, 3) * std + mean  # (N, 3) in raster order of each frame
    g = ready.geometry
    order = g.partition * TOKENS + g.cells[:, 0] * 16 + g.cells[:, 1]  # each token's block of its frame
    seen = colour[order, :2] * torch.tensor([width, height])  # (N, 2) the mean pixel position it saw
    assert ((seen >= g.boxes[:, :2] - 2) & (seen <= g.boxes[:, 2:] + 2)).all()


def test_the_signals_of_a_clip_line_up_with_its_tokens(tiny, clip):
    ready = tiny.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    with torch.inference_mode():
        features, signals = tiny.encode(ready, (FEATURES, HIDDEN_FEATURE, "cls@last", "keys@feature"))
        torch.testing.assert_close(tiny.project(signals[HIDDEN_FEATURE]), features)
    assert all(value.shape[0] == len(ready.geometry) == 4 * TOKENS for value in signals.values())
    assert not signals["cls@last"].isnan().any()


@contextlib.contextmanager
def llm_lengths(backend):
    """The sequence lengths the LLM's forward passes get, as inputs_embeds."""
    lengths: list[int] = []
    hook = backend.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        yield lengths
    finally:
        hook.remove()


@pytest.mark.parametrize("method", ["random", "uniform", "cls", "divprune", "visionzip"])
def test_image_methods_run_per_frame_and_the_llm_gets_fewer_tokens(tiny, clip, method):
    ready = tiny.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    with llm_lengths(tiny) as lengths:
        result = run(tiny, clip, PROMPT, method, 0.25, max_new_tokens=2)
    t, n = result.tokens, 4 * TOKENS
    assert t["visual_full"] == n and t["visual_kept"] == fraction_of(0.25, n) == len(result.selection.keep) == 256
    assert [f["kept"] for f in t["by_frame"]] == [64] * 4  # each frame its share
    assert [f["frames"] for f in t["by_frame"]] == [[i] for i in clip.indices]
    assert [f["time_s"] for f in t["by_frame"]] == clip.times_s
    assert lengths[0] == ready.text_tokens + 256 < ready.text_tokens + n  # the prefill: text and the kept tokens
    assert lengths[1:] == [1]  # then one new token at a time


@pytest.mark.parametrize("method", ["frames", "vidcom2", "evs", "fastvid", "holitom", "dycoke", "free-video-llm"])
def test_the_video_methods_run_on_a_clip(tiny, clip, method, request):
    """Each meets its budget of the clip's tokens (HoliTom's is the mean over the LLM's layers, so fewer stay after
    its merge inside the LLM), and the frames' counts add up; Free Video-LLM reads the prompt with a CLIP model
    (tests/test_freevideollm.py's tiny one)."""
    free = method == "free-video-llm"
    settings = {"text_encoder": request.getfixturevalue("clip_model")} if free else None
    result = run(tiny, clip, PROMPT, method, 0.25, settings=settings, max_new_tokens=1)
    t, n = result.tokens, 4 * TOKENS
    assert t["visual_full"] == n and 0 < t["visual_kept"] <= fraction_of(0.25, n)
    assert sum(f["full"] for f in t["by_frame"]) == n and sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"]
    if method != "holitom":
        assert t["visual_kept"] == fraction_of(0.25, n)


def test_the_frames_baseline_encodes_only_the_frames_it_keeps(tiny, clip):
    """`frames` keeps one whole frame of four: only that frame goes through the encoder, with the features a run
    on every frame gives it."""
    from explorer.engine.pipeline import method_for, select

    chosen, budget = method_for(tiny, "frames", None, 0.25)
    selected = select(tiny, clip, PROMPT, chosen, budget, 1)
    keep = selected.selection.keep
    with torch.inference_mode():
        every, _ = tiny.encode(selected.prepared, ())
    torch.testing.assert_close(selected.features[keep], every[keep])
    assert selected.vision.sequences == (32 * 32,) and selected.every.sequences == (32 * 32,) * 4


def test_the_cli_runs_a_clip(video):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            ["run", "--model", "tiny-internvl3", "--video", str(video), "--frames", "3", "--prompt", PROMPT,
             "--method", "uniform", "--budget", "0.25", "--max-new-tokens", "1", "--json"]
        )  # fmt: skip
    assert code == 0, err.getvalue()
    tokens = json.loads(out.getvalue())["tokens"]
    assert tokens["visual_full"] == 3 * TOKENS and tokens["visual_kept"] == fraction_of(0.25, 3 * TOKENS)
    assert [f["frames"] for f in tokens["by_frame"]] == [[0], [10], [20]]  # transformers' sampler: 30 * i // 3
    assert [f["kept"] for f in tokens["by_frame"]] == [64] * 3


def test_a_clip_and_its_reversal_differ_only_in_the_frames_order(tiny, clip):
    """The prompt is the same whatever the frames are (InternVL's says no time), and the pixels follow the frames."""
    ahead = tiny.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    back = tiny.prepare_video(clip.frames[::-1], PROMPT)
    assert torch.equal(ahead.inputs["input_ids"], back.inputs["input_ids"])
    assert torch.equal(ahead.inputs["pixel_values"], back.inputs["pixel_values"].flip(0))
