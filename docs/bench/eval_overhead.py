"""What `python -m explorer eval` adds per question over the pipeline's own run of the same question.

    python docs/bench/eval_overhead.py [--model small-llava-next] [--methods none,hired,fastv] [--budget 0.2]
        [--copies 4] [--repeats 5] [--max-new-tokens 8]

The example set (assets/eval), copied `--copies` times, is answered by each method two ways, taking turns
round after round: by `explorer.run` on each question in a loop (the pipeline's own run), and by one cell
of the evaluation grid (`evaluate.evaluate_cell`: lmms-eval builds the requests, the lmms-eval model answers
them through the same pipeline, lmms-eval scores and aggregates them, and the cell's files are written).
Prints the median seconds per question of each and the evaluation's overhead over the pipeline. The first
round is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from explorer import evaluate, localdata, run
from explorer.core import Budget
from explorer.lmms import ExplorerModel

EXAMPLE = Path(__file__).parents[2] / "assets" / "eval"


def copies(folder: Path, count: int) -> list[dict]:
    """The example set `count` times over, as one data.jsonl in `folder`."""
    shutil.copytree(EXAMPLE / "images", folder / "images")
    docs = localdata.read(EXAMPLE)
    lines = [json.dumps({**doc, "id": f"{doc['id']}-{i}"}) for i in range(count) for doc in docs]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return localdata.read(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small-llava-next")
    parser.add_argument("--methods", default="none,hired,fastv")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    evaluate.logs_to_stderr()
    work = Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    docs = copies(work / "set", args.copies)
    model = ExplorerModel(args.model, device="cpu")
    print(f"{args.model}, {len(docs)} questions, {args.max_new_tokens} new tokens at most, {args.repeats} rounds")
    print("| method | pipeline s/question | eval s/question | overhead | tokens generated (pipeline, eval) |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        budget = None if method == "none" else Budget(fraction=args.budget)
        cell = evaluate.Cell(method, budget)
        grid = evaluate.Grid(
            args.model, (cell,), work / "out", dataset=str(work / "set"), max_new_tokens=args.max_new_tokens
        )
        source = evaluate.Tasks(grid)
        pipeline, evaluation, generated = [], [], [0, 0]
        for round_ in range(args.repeats + 1):
            start = time.perf_counter()
            for doc in docs:
                image = str(work / "set" / doc["image"])
                result = run(
                    model.backend, image, doc["question"], method, budget or 1.0, max_new_tokens=args.max_new_tokens
                )
                generated[0] += result.tokens["generated"]
            middle = time.perf_counter()
            evaluate.evaluate_cell(model, grid, cell, source, f"{method} round {round_}")
            end = time.perf_counter()
            generated[1] += sum(record["generated"] for record in model.records)
            if round_:  # the first round warms up
                pipeline.append((middle - start) / len(docs))
                evaluation.append((end - middle) / len(docs))
        mine, theirs = statistics.median(pipeline), statistics.median(evaluation)
        print(
            f"| {method} | {mine:.4f} | {theirs:.4f} | {theirs / mine - 1:+.1%} | {generated[0]}, {generated[1]} |",
            flush=True,
        )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
