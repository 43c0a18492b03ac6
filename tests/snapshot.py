"""The deterministic part of what the explorer prints, for checking that a refactoring changes nothing.

    python tests/snapshot.py OUT.json      # run before and after a change, then: cmp before.json after.json

For every tiny model, example image and method that runs on the model (at 20%): `python -m explorer run
--json` without its timing and memory, plus the kept indices; then the bench's deterministic columns
(tokens, FLOPs, KV bytes, drift, answers) for a few methods on one model and image. Everything here is
computed, not timed, so two runs of the same code give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import backends  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.core import Budget  # noqa: E402
from explorer.engine.pipeline import run  # noqa: E402
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
)
IMAGES = ("coffee.jpg", "chart.png", "astronaut.jpg", "panorama.jpg", "rocket.jpg")
PROMPT = "What is in this picture?"
BENCH_COLUMNS = ("method", "budget", "visual_kept", "visual_full", "visual_layer_mean", "prefill_tflops", "kv_bytes")
BENCH_COLUMNS += (*bench.DRIFT, "answer")


def cli_json(model: str, image: Path, method: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "--model", model, "--image", str(image), "--prompt", PROMPT, "--method", method, "--json"])
    assert code == 0, f"{model} {image.name} {method} failed"
    printed = json.loads(out.getvalue())
    return {k: v for k, v in printed.items() if k not in ("timing", "memory")}


def snapshot() -> dict:
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
    backend = backends.load("tiny-llava-next")
    budgets = [Budget(fraction=f) for f in (0.4, 0.1)]
    swept = bench.sweep(
        backend, ROOT / "assets/coffee.jpg", PROMPT, ["cls", "hired", "fastv", "tome-vit"], budgets, 8, 1, 0
    )
    rows["bench"] = [{k: row[k] for k in BENCH_COLUMNS} for row in swept]
    return rows


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(snapshot(), indent=1, sort_keys=True))
