"""The deterministic part of what the explorer prints, for checking that a refactoring changes nothing.

    python tests/snapshot.py OUT.json      # run before and after a change, then: cmp before.json after.json
    python tests/snapshot.py OUT.json clips    # only some sections: images, bench, clips (comma-separated)

For every tiny model, example image and method that runs on the model (at 20%): `python -m explorer run
--json` without its timing and memory, plus the kept indices; then the bench's deterministic columns
(tokens, FLOPs, KV bytes, drift, answers) for a few methods on one model and image. On a video clip it
draws (`test_video.write`, 4 frames sampled), for each video family's tiny model, every method at two
budgets (a method inside the LLM with budget_after_cuts=true: the layers before its cuts see every token, so a
mean over the layers that low is out of some methods' reach even at the checkpoints' depth, PDrop's first quarter
of the layers seeing all): `run --video --json` the same way, or the reason a method is refused; and the bench's
columns on the clip. Everything here is computed, not timed, so two runs of the same code give the same bytes. Nothing is
fetched from the Hub (HF_HUB_OFFLINE): a method that needs a download says so, the same way every time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads it once

import av  # noqa: E402
import numpy as np  # noqa: E402

import backends  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.core import Budget  # noqa: E402
from explorer.engine.pipeline import run  # noqa: E402
from explorer.engine.video import load_video  # noqa: E402
from explorer.evaluation import bench  # noqa: E402
from explorer.methods import METHODS, unavailable  # noqa: E402

MODELS = (
    "tiny-llava-next",
    "tiny-llava-onevision",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-smolvlm",
    "tiny-idefics3",
    "tiny-llava-1.5",
    "tiny-gemma3",
    "tiny-qwen3.5",
    "tiny-internvl3",
)
IMAGES = ("coffee.jpg", "chart.png", "astronaut.jpg", "panorama.jpg", "rocket.jpg")
PROMPT = "What is in this picture?"
BENCH_COLUMNS = ("method", "budget", "visual_kept", "visual_full", "visual_layer_mean", "prefill_tflops", "kv_bytes")
BENCH_COLUMNS += (*bench.DRIFT, "answer")
VIDEO_MODELS = (
    "tiny-llava-onevision",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-qwen3-vl",
    "tiny-qwen3.5",
    "tiny-smolvlm",
    "tiny-internvl3",
)
CLIP_BUDGETS = ("0.25", "0.1")
CLIP_PROMPT = "What happens in this video?"


def cli_json(model: str, image: Path, method: str, *options: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    media = ["--video", str(image), "--frames", "4"] if image.suffix == ".mp4" else ["--image", str(image)]
    prompt = CLIP_PROMPT if image.suffix == ".mp4" else PROMPT
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "--model", model, *media, "--prompt", prompt, "--method", method, "--json", *options])
    assert code == 0, f"{model} {image.name} {method} failed: {err.getvalue().strip()}"
    printed = json.loads(out.getvalue())
    return {k: v for k, v in printed.items() if k not in ("timing", "memory")}


def images() -> dict:
    rows = {}
    for model in MODELS:
        backend = backends.load(model)
        for name in IMAGES:
            image = ROOT / "assets" / name
            for method in METHODS:
                if unavailable(method, backend):
                    continue
                try:
                    printed = cli_json(model, image, method)
                except AssertionError as error:
                    rows[f"{model} {name} {method}"] = str(error)
                    continue
                kept = run(backend, image, PROMPT, method, 0.2, max_new_tokens=4).selection.keep.tolist()
                printed["kept_sha256"] = hashlib.sha256(json.dumps(kept).encode()).hexdigest()
                rows[f"{model} {name} {method}"] = printed
        print(model, file=sys.stderr)
    return rows


def bench_rows() -> dict:
    rows = {}
    backend = backends.load("tiny-llava-next")
    budgets = [Budget(fraction=f) for f in (0.4, 0.1)]
    swept = bench.sweep(
        backend, ROOT / "assets/coffee.jpg", PROMPT, ["cls", "hired", "fastv", "tome-vit"], budgets, 8, 1, 0
    )
    rows["bench"] = [{k: row[k] for k in BENCH_COLUMNS} for row in swept]
    return rows


def draw_clip(path: Path) -> Path:
    """16 frames of 336x224 at 8 fps (Qwen2-VL: 96 tokens a temporal group): a colour gradient, and a white
    square crossing it left to right."""
    y, x = np.mgrid[0:224, 0:336]
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=8, options={"qscale": "2", "flags": "+bitexact"})
        stream.width, stream.height, stream.pix_fmt = 336, 224, "yuv420p"
        for i in range(16):
            frame = np.stack([x * 255 // 335, y * 255 // 223, np.full_like(x, 16 * i)], -1).astype(np.uint8)
            frame[80:144, 16 * i : 16 * i + 64] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def fields(method) -> set[str]:
    """The names of a method's settings."""
    return {field.name for field in dataclasses.fields(method)}


def clips() -> dict:
    """Every method at CLIP_BUDGETS on a drawn clip, on each video family's tiny model, and a bench on it."""
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        video = draw_clip(Path(folder) / "clip.mp4")
        clip = load_video(video, frames=4)
        for model in VIDEO_MODELS:
            backend = backends.load(model)
            for method, budget in itertools.product(METHODS, CLIP_BUDGETS):
                key = f"{model} clip {method} {budget}"
                settings = {"budget_after_cuts": True} if "budget_after_cuts" in fields(METHODS[method]) else {}
                options = ["--budget", budget, "--max-new-tokens", "8", *[f"--set={k}=true" for k in settings]]
                try:
                    rows[key] = cli_json(model, video, method, *options)
                except AssertionError as error:  # refused: the reason is part of the snapshot
                    rows[key] = str(error)
                    continue
                result = run(backend, clip, CLIP_PROMPT, method, float(budget), settings=settings, max_new_tokens=1)
                kept = result.selection.keep
                rows[key]["kept_sha256"] = hashlib.sha256(json.dumps(kept.tolist()).encode()).hexdigest()
            print(model, "clip", file=sys.stderr)
        backend = backends.load("tiny-llava-onevision")
        budgets = [Budget(fraction=0.25)]
        swept = bench.sweep(backend, clip, CLIP_PROMPT, ["frames", "random", "cls"], budgets, 4, 1, 0, floor=True)
    rows["clip bench"] = [{k: row[k] for k in (*BENCH_COLUMNS, "by_frame")} for row in swept]
    return rows


SECTIONS = {"images": images, "bench": bench_rows, "clips": clips}


def snapshot(only: list[str] | None = None) -> dict:
    """The sections named in `only` (default: all of them), in one dict."""
    return {key: value for name in only or SECTIONS for key, value in SECTIONS[name]().items()}


if __name__ == "__main__":
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    Path(sys.argv[1]).write_text(json.dumps(snapshot(chosen), indent=1, sort_keys=True))
