"""What `python -m explorer eval` adds per question over the pipeline's own run of the same question.

    python docs/bench/eval_overhead.py [--model small-llava-next] [--methods none,hired,fastv] [--budget 0.2]
        [--copies 4] [--repeats 5] [--max-new-tokens 8]

The example set (assets/eval), copied `--copies` times, is answered by each method two ways, taking turns
round after round: by `explorer.run` on each question in a loop (the pipeline's own run), and by one cell
of the evaluation grid (`evaluate.evaluate_cell`: lmms-eval builds the requests, the lmms-eval model answers
them through the same pipeline, lmms-eval scores and aggregates them, and the cell's files are written).
Prints the median seconds per question of each, wall-clock and CPU (this process's and its children's, all
threads: less disturbed by other work on a shared machine), and the evaluation's overhead over the
pipeline. The first round is a warm-up and is not counted. `--threads` sets torch's threads. A method that
prunes inside the LLM counts its budget as the tokens left after its cut (`budget_after_cuts`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from explorer import run
from explorer.core import Budget
from explorer.evaluation import evaluate, localdata
from explorer.evaluation.lmms import ExplorerModel
from explorer.methods import METHODS

EXAMPLE = Path(__file__).parents[2] / "assets" / "eval"


def copies(folder: Path, count: int) -> list[dict]:
    """The example set `count` times over, as one data.jsonl in `folder`."""
    shutil.copytree(EXAMPLE / "images", folder / "images")
    docs = localdata.read(EXAMPLE)
    lines = [json.dumps({**doc, "id": f"{doc['id']}-{i}"}) for i in range(count) for doc in docs]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return localdata.read(folder)


def clock() -> tuple[float, float]:
    """Wall-clock seconds, and CPU seconds of this process (every thread) and of its children."""
    cpu = os.times()
    return time.perf_counter(), cpu.user + cpu.system + cpu.children_user + cpu.children_system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small-llava-next")
    parser.add_argument("--methods", default="none,hired,fastv")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    evaluate.logs_to_stderr()
    work = Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    docs = copies(work / "set", args.copies)
    model = ExplorerModel(args.model, device="cpu")
    print(f"{args.model}, {len(docs)} questions, {args.max_new_tokens} new tokens at most, {args.repeats} rounds, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(
        "| method | pipeline s/question | eval s/question | overhead | pipeline CPU s | eval CPU s | overhead (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        budget = None if method == "none" else Budget(fraction=args.budget)
        # an llm-stage budget as the tokens left after the cut, as measured (a layer mean of 20% is out of
        # reach of a cut at layer 2 of the tiny model's 4)
        settings = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}
        cell = evaluate.Cell(method, budget, settings)
        grid = evaluate.Grid(
            args.model, (cell,), work / "out", dataset=str(work / "set"), max_new_tokens=args.max_new_tokens
        )
        source = evaluate.Tasks(grid)
        times, generated = [], [0, 0]  # per round: (pipeline, eval) wall and CPU seconds per question
        for round_ in range(args.repeats + 1):
            start = clock()
            for doc in docs:
                image = str(work / "set" / doc["image"])
                result = run(
                    model.backend,
                    image,
                    doc["question"],
                    method,
                    budget or 1.0,
                    settings=settings,
                    max_new_tokens=args.max_new_tokens,
                )
                generated[0] += result.tokens["generated"]
            middle = clock()
            evaluate.evaluate_cell(model, grid, cell, source, f"{method} round {round_}")
            end = clock()
            generated[1] += sum(record["generated"] for record in model.records)
            if round_:  # the first round warms up
                times.append([(b - a) / len(docs) for a, b in [*zip(start, middle), *zip(middle, end)]])
        wall, cpu, eval_wall, eval_cpu = (statistics.median(t[i] for t in times) for i in (0, 1, 2, 3))
        assert generated[0] == generated[1], generated  # the same answers, as long
        print(
            f"| {method} | {wall:.4f} | {eval_wall:.4f} | {eval_wall / wall - 1:+.1%} | {cpu:.4f} | {eval_cpu:.4f} "
            f"| {eval_cpu / cpu - 1:+.1%} |",
            flush=True,
        )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
