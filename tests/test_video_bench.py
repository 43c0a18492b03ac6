"""Video in the bench (issue 25): `python -m explorer bench --video PATH --frames 2,3` gives the image bench's
table, CSV and chart with a group of rows per frame count, and the `--random-weights` full-size
architectures of the video families take a clip: their geometry is their processor's, from their config."""

import csv
import math

import pytest
import torch
from test_video import write

import backends
from explorer import ExplorerError
from explorer.cli import _runnable, main
from explorer.core import fraction_of
from explorer.engine.video import load_video
from explorer.methods import METHODS

PROMPT = "What happens in this video?"
PER_FRAME = 196  # LLaVA-OneVision's tokens per frame: 27x27 patches pooled to 14x14; one newline per clip


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4", "mpeg4", count=30)


@pytest.fixture(scope="module")
def onevision():
    return backends.load("tiny-llava-onevision", "cpu")


@pytest.fixture(scope="module")
def benched(video, tmp_path_factory):
    """frames and random at 50% on clips of 2 and 3 frames, with the floor."""
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--model", "tiny-llava-onevision", "--device", "cpu", "--video", str(video), "--frames", "2,3"]
    args += ["--methods", "frames,random", "--budgets", "0.5", "--repeats", "1", "--warmup", "0"]
    args += ["--max-new-tokens", "2", "--csv", str(out / "bench.csv"), "--plot", str(out / "bench.html")]
    assert main(args) == 0
    with open(out / "bench.csv") as table:
        return out, list(csv.DictReader(table))


def test_a_group_of_rows_per_frame_count_with_the_clips_token_counts(benched):
    out, rows = benched
    for frames in (2, 3):
        mine = [r for r in rows if r["frames"] == str(frames)]
        n = frames * PER_FRAME + 1
        assert [(r["method"], r["budget"]) for r in mine][:3] == [("none", "-"), ("frames", "0.5"), ("random", "0.5")]
        assert {r["visual_full"] for r in mine} == {str(n)} and {r["size"] for r in mine} == {"64x32"}
        assert mine[1]["visual_kept"] == mine[2]["visual_kept"] == str(fraction_of(0.5, n))
        assert any(r["method"] == "uniform" for r in mine)  # the floor
        for row in mine:
            parts = [part.split("/") for part in row["by_frame"].split()]
            assert len(parts) == frames and sum(int(full) for _, full in parts) == n
            assert sum(int(kept) for kept, _ in parts) == int(row["visual_kept"])
            share = float(row["selection_s"]) / float(row["ttft_s"])
            assert math.isclose(float(row["selection_share"]), share) and 0 <= share < 1
    assert "plotly" in (out / "bench.html").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "2"], "--sizes and --batch are for images"),
        (["--sizes", "64x64"], "--sizes and --batch are for images"),
        (["--frames", "2,x"], "--frames takes whole numbers, comma-separated, got '2,x'"),
        (["--frames", "65"], "the number of frames must be a whole number from 1 to 64"),
    ],
)
def test_bad_video_bench_arguments_are_refused_before_any_model_loads(video, capsys, extra, message):
    args = ["bench", "--model", "no-such-model", "--video", str(video), "--methods", "frames", *extra]
    assert main(args) == 2 and message in capsys.readouterr().err


def test_frames_are_for_a_video(capsys):
    assert main(["bench", "--image", "assets/coffee.jpg", "--frames", "4", "--model", "no-such-model"]) == 2
    assert "--frames and --fps sample a video: give --video, not --image" in capsys.readouterr().err


def test_every_method_that_runs_on_clips_is_benched_and_the_others_say_why(onevision, video, capsys):
    clip = load_video(video, frames=2)
    runs = _runnable(onevision, clip, PROMPT)
    said = capsys.readouterr().err
    assert {"frames", "fastvid", "vidcom2", "evs", "random", "hired"} <= set(runs)
    for name in set(METHODS) - set(runs) - {"none", "uniform"}:
        assert f"skipped: {name}" in said, name  # each one left out says why
    assert "tome-vit" not in runs  # it merges inside the encoder, and a clip's tokens are pooled patches


VIDEO = ("tiny-llava-onevision", "tiny-qwen2-vl")  # the families with video among the full-size architectures


@pytest.mark.parametrize("name", [n for n, tiny in backends.FULL_SIZE.items() if tiny in VIDEO])
def test_full_size_video_architectures_take_a_clip(name, video):
    """Built on the meta device (no memory): a clip's geometry follows from the stored config (vision
    patches, pooling or merging) and is exactly what the processor inserts for it."""
    built = backends.full_size(name, torch.device("meta"))
    tiny = backends.load(backends.FULL_SIZE[name], "cpu")
    clip = load_video(video, frames=4)
    frames = [frame.resize((224, 224)) for frame in clip.frames]
    prepared = tiny.prepare_video(frames, PROMPT, clip.times_s)  # the processor the full-size model runs with
    geometry, _ = built.video_layout(len(frames), frames[0].size)
    assert len(geometry) == len(prepared.geometry) and geometry.names == prepared.geometry.names
    assert built.model.config.video_token_id == tiny.model.config.video_token_id
    vision = backends.stored_config(name).vision_config
    if built.family == "LLaVA-OneVision":  # every frame squashed to the tower's size, its grid pooled 2x2
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        assert len(geometry) == 4 * side * side + 1 == 4 * PER_FRAME + 1
    else:  # Qwen2-VL: 2 frames a temporal group, 2x2 patches a token
        per_group = (224 // vision.patch_size) ** 2 // vision.spatial_merge_size**2
        assert len(geometry) == 4 // vision.temporal_patch_size * per_group == 2 * 64


def test_an_answer_holding_the_video_placeholder_has_no_drift(onevision, video):
    """A random-weight model may answer with its own `<video>` token (small-llava-onevision does): fed back
    after the prompt it would read as one more visual token, so it is not scored, and the bench leaves the
    drift out."""
    from explorer.engine import fidelity
    from explorer.evaluation import bench

    clip = load_video(video, frames=2)
    placeholder = onevision.model.config.video_token_id
    with pytest.raises(ExplorerError, match="the answer holds the visual placeholder token"):
        fidelity.logprobs(onevision, clip, PROMPT, [placeholder, placeholder])
    rows = [{"answer_ids": [placeholder], "kl": None, "ttft_s": 1.0}]
    bench._drift(onevision, clip, PROMPT, rows, [("none", None)])
    assert rows[0]["kl"] is None
