"""A clip end to end: decoded from a file, through the pipeline and the CLI on tiny-llava-onevision; the
unreduced answer as stock generate() gives it on the same frames, every budget met, `by_frame`."""

import contextlib
import io
import json

import pytest
import torch
from test_video import write

import backends
from explorer import ExplorerError, run
from explorer.cli import main
from explorer.core import fraction_of
from explorer.engine.video import load_video
from explorer.methods.common import patches_first

PROMPT = "What happens in this video?"


@pytest.fixture(scope="module")
def onevision():
    return backends.load("tiny-llava-onevision", "cpu")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4", "mpeg4", count=30)


def test_unreduced_the_answer_is_stock_generate_s_on_the_same_frames(onevision, video):
    clip = load_video(video, frames=4)
    ours = run(onevision, clip, PROMPT, "none", max_new_tokens=5, min_new_tokens=5)
    text = onevision.chat(PROMPT, part="video")
    inputs = onevision.processor(videos=[clip.frames], text=text, return_tensors="pt", do_sample_frames=False)
    with torch.inference_mode():
        stock = onevision.model.generate(**inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert list(ours.answer_ids) == stock[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.tokens["visual_full"] == 4 * 196 + 1 == ours.tokens["visual_kept"]


@pytest.mark.parametrize("method", ["frames", "random", "uniform", "cls", "hired", "divprune", "visionzip"])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_every_budget_is_met_on_a_clip_and_by_frame_adds_up(onevision, video, method, budget):
    clip = load_video(video, frames=4)
    result = run(onevision, clip, PROMPT, method, budget, max_new_tokens=1)
    t, g = result.tokens, result.geometry
    n = 4 * 196 + 1
    assert t["visual_full"] == n and t["visual_kept"] == fraction_of(budget, n) == len(result.selection.keep)
    frames = t["by_frame"]
    assert [f["frames"] for f in frames] == [[i] for i in clip.indices] and [
        f["time_s"] for f in frames
    ] == clip.times_s
    assert sum(f["full"] for f in frames) == n and sum(f["kept"] for f in frames) == t["visual_kept"]
    if method != "frames":  # an image method: each frame its share of the budget
        shares = patches_first(g, t["visual_kept"])[:4]
        assert [f["kept"] for f in frames] == shares
    else:  # whole frames, the rest from one more
        assert sorted((f["kept"] for f in frames), reverse=True)[0] == 196 or t["visual_kept"] < 196


def test_a_method_that_reads_the_llm_runs_on_the_clip_s_sequence(onevision, video):
    clip = load_video(video, frames=4)
    result = run(onevision, clip, PROMPT, "fastv", 0.2, settings={"budget_after_cuts": True}, max_new_tokens=1)
    assert result.tokens["visual_kept"] == fraction_of(0.2, 785) and result.tokens["llm_cuts"]


def test_what_a_clip_or_an_image_cannot_take_is_refused_with_the_reason(onevision, video, backend):
    clip = load_video(video, frames=2)
    with pytest.raises(ExplorerError, match="works on the frames of a video: give it a clip"):
        run(onevision, clip.frames[0], PROMPT, "frames", 0.5, max_new_tokens=1)
    with pytest.raises(ExplorerError, match="a clip's frames have none"):
        run(onevision, clip, PROMPT, "globalcom2", 0.5, max_new_tokens=1)
    with pytest.raises(ExplorerError, match="pooled from several encoder patches"):
        run(onevision, clip, PROMPT, "tome-vit", 0.5, max_new_tokens=1)
    with pytest.raises(ExplorerError, match="takes no video here yet"):
        run(backend, clip, PROMPT, "none", max_new_tokens=1)  # tiny-llava-next
    assert run(onevision, clip, PROMPT, "cls", 0.5, max_new_tokens=1).done  # and the next run works


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_the_cli_runs_a_video_and_prints_by_frame(video):
    code, out, err = cli(
        "run", "--model", "tiny-llava-onevision", "--video", str(video), "--frames", "3", "--prompt", PROMPT,
        "--method", "frames", "--budget", "0.4", "--max-new-tokens", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    printed = json.loads(out)
    tokens = printed["tokens"]
    assert tokens["visual_full"] == 3 * 196 + 1 and tokens["visual_kept"] == fraction_of(0.4, 589)
    assert [f["frames"] for f in tokens["by_frame"]] == [[0], [10], [20]]  # transformers' sampler: 30 * i // 3
    assert sorted(f["kept"] for f in tokens["by_frame"]) == [0, 39, 196]  # one whole frame, 39 from another


def test_the_cli_says_what_is_wrong_with_a_video(tmp_path, video):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(video.read_bytes()[:300])
    code, _, err = cli("run", "--model", "tiny-llava-onevision", "--video", str(broken), "--prompt", PROMPT)
    assert code != 0 and "broken.mp4" in err and "corrupt" in err
    code, _, err = cli("run", "--image", str(video), "--frames", "4", "--prompt", PROMPT)
    assert code != 0 and "--frames and --fps sample a video" in err


@pytest.mark.parametrize("model", ["tiny-llava-onevision", "tiny-qwen2-vl", "tiny-smolvlm"])
@pytest.mark.parametrize("method", ["frames", "uniform"])
def test_a_method_reading_no_signal_encodes_only_the_frames_it_keeps(model, method, video):
    from explorer.engine.pipeline import method_for, select

    backend = loaded(model)
    clip = load_video(video, frames=6)
    chosen, budget = method_for(backend, method, None, 0.25)
    selected = select(backend, clip, PROMPT, chosen, budget, 1)
    g, keep = selected.prepared.geometry, selected.selection.keep
    with torch.inference_mode():
        every, _ = backend.encode(selected.prepared, ())  # (N, D) every frame through the encoder
    torch.testing.assert_close(selected.features[keep], every[keep])  # the same features for what is kept
    kept = set(g.partition[keep].tolist()) & set(g.frames)  # the frames (or groups) holding kept tokens
    assert len(selected.vision.sequences) == len(kept) * len(selected.every.sequences) // len(g.frames)
    assert selected.every.sequences == tuple(backend.encoder_sequences(selected.prepared))
    if method == "frames":  # whole frames: fewer frames through the encoder, and a cheaper vision stage
        assert len(kept) < len(g.frames)
        result = run(backend, clip, PROMPT, method, 0.25, max_new_tokens=1)
        projected = result.cost["projected"]
        assert projected["reduced"]["vision_flops"] < projected["full"]["vision_flops"]
        assert result.cost["vision_flops"] < run(backend, clip, PROMPT, "none", max_new_tokens=1).cost["vision_flops"]


_LOADED: dict = {}


def loaded(model: str):
    """The tiny model `model`, loaded once for this module's tests."""
    if model not in _LOADED:
        _LOADED[model] = backends.load(model, "cpu")
    return _LOADED[model]


@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_every_vision_stage_method_that_runs_on_a_clip_meets_its_budget_exactly(onevision, video, budget):
    from explorer.methods import METHODS, make, unavailable

    clip = load_video(video, frames=4)
    n, ran = 4 * 196 + 1, []
    for name, method in METHODS.items():
        if method.stage != "vision" or not method.budgeted or unavailable(name, onevision, clip=True):
            continue
        if method.merging is not None or "thumbnail" in method.requires or make(name).adaptive:
            continue  # refused on a clip with the reason (tested above), or picks its own count
        if any(need.startswith("prompt-") for need in method.needs):
            continue  # free-video-llm needs a CLIP model: tests/test_freevideollm.py
        result = run(onevision, clip, PROMPT, name, budget, max_new_tokens=1)
        assert result.tokens["visual_kept"] == fraction_of(budget, n) == len(result.selection.keep), name
        assert sum(f["kept"] for f in result.tokens["by_frame"]) == result.tokens["visual_kept"], name
        ran.append(name)
    assert {"frames", "vidcom2", "evs", "fastvid", "hired", "divprune", "tome"} <= set(ran)
    # HoliTom also merges inside the LLM, its budget a layer mean: tests/test_holitom.py
