"""`python -m explorer eval`: accuracy at a budget, methods x budgets on lmms-eval tasks or a local folder.

One model load for the whole grid (`lmms.ExplorerModel.configure` switches method and budget), and the
unreduced model once. Each cell is one lmms-eval evaluation (`simple_evaluate`), written to its own folder
of the output: lmms-eval's own result and sample files, the pipeline's numbers of every sample
(explorer_samples.jsonl) and, last, cell.json with the cell's summary rows. A cell whose cell.json is there
is done, and is not computed again; a folder without one is a cell cut short, and is computed anew.
Then summary.json and summary.csv (`accuracy.COLUMNS`) and the chart, as HTML and PNG.

Under `accelerate launch --num_processes N` every process runs the same grid on its share of the
questions; the first process decides which cells are left, gathers the others' numbers and writes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.loggers import EvaluationTracker
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import get_datetime_str

from ..core import Budget, ExplorerError
from ..methods import make
from ..views.visual import save_chart
from . import accuracy, localdata
from .lmms import ExplorerModel

MARK = "cell.json"  # written last: the cell is done
SAMPLES = "explorer_samples.jsonl"


@dataclass(frozen=True)
class Cell:
    """One evaluation of the grid: a method at a budget (None: the unreduced model), with its settings."""

    method: str
    budget: Budget | None
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """Its folder's name: none, hired_0.2, fastv_192t."""
        if self.budget is None:
            return self.method
        amount = f"{self.budget.fraction:g}" if self.budget.fraction is not None else f"{self.budget.tokens}t"
        return f"{self.method}_{amount}"

    @property
    def number(self) -> float:
        """The budget as it was given: a fraction or a count of tokens; 1 for the unreduced model."""
        if self.budget is None:
            return 1
        return self.budget.fraction if self.budget.fraction is not None else self.budget.tokens


@dataclass(frozen=True)
class Grid:
    model: str
    cells: tuple[Cell, ...]
    output: Path
    tasks: tuple[str, ...] = ()  # lmms-eval task names, or
    dataset: str | None = None  # a local folder with data.jsonl
    limit: int | None = None  # questions per task
    max_new_tokens: int | None = None  # over every task's own
    device: str | None = None
    random_weights: bool = False
    frames: int | None = None  # sampled from each video (None: 8 on a CPU, 16 on a GPU)


def cells(methods: list[str], budgets: list[Budget], settings: dict[str, dict] | None = None) -> tuple[Cell, ...]:
    """The unreduced model, then every method x budget, each method with its settings (method -> dict)."""
    settings = settings or {}
    grid = [Cell("none", None)]
    for method in dict.fromkeys(m for m in methods if m != "none"):
        make(method, **settings.get(method, {}))  # unknown methods and settings fail here
        grid += [Cell(method, budget, dict(settings.get(method, {}))) for budget in dict.fromkeys(budgets)]
    return tuple(grid)


def run(grid: Grid) -> list[dict]:
    """Every cell of the grid not done yet, then the summary (on the first process); returns its rows."""
    source = Tasks(grid)
    state = Accelerator()  # this process among those `accelerate launch` started (ACCELERATE_USE_CPU: on CPUs)
    grid.output.mkdir(parents=True, exist_ok=True)
    left = _shared(state, lambda: [c.name for c in grid.cells if not _done(grid, c, source)])
    model = ExplorerModel(grid.model, device=grid.device, random_weights=grid.random_weights, frames=grid.frames)
    for cell in grid.cells:
        model.configure(cell.method, cell.budget, cell.settings)  # a method this model cannot run fails now
    for i, cell in enumerate(c for c in grid.cells if c.name in left):
        evaluate_cell(model, grid, cell, source, f"[{i + 1}/{len(left)}] {cell.method} {cell.number:g}")
    if state.process_index != 0:
        return []
    rows = [row for cell in grid.cells for row in _marked(grid, cell)["rows"]]
    _write(rows, grid.output)
    return rows


class Tasks:
    """What each cell evaluates: lmms-eval tasks by name, checked against its index, or the local folder."""

    def __init__(self, grid: Grid):
        if bool(grid.tasks) == bool(grid.dataset):
            raise ExplorerError("give lmms-eval tasks (--tasks) or a local folder (--dataset), one of the two")
        self.dataset = grid.dataset
        if grid.dataset:
            localdata.read(grid.dataset)  # every line and image checked now
            self.names = (localdata.name_of(grid.dataset),)
            self.manager = TaskManager(include_defaults=False)
            self.version = localdata.fingerprint(grid.dataset)
            return
        self.manager, self.names, self.version = TaskManager(), tuple(grid.tasks), None
        for name in self.names:
            if name not in self.manager.all_tasks:
                close = difflib.get_close_matches(name, self.manager.all_tasks, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ExplorerError(f"unknown lmms-eval task {name!r}{hint} (`python -m lmms_eval tasks` lists them)")

    def get(self) -> list:
        """The tasks for one evaluation (a local folder's anew, as lmms-eval keeps state in a task)."""
        return [localdata.LocalTask(self.dataset)] if self.dataset else list(self.names)


def evaluate_cell(model: ExplorerModel, grid: Grid, cell: Cell, source: Tasks, label: str) -> None:
    """One cell: lmms-eval's evaluation, then (first process) its files and, last, its mark."""
    folder = grid.output / cell.name
    if model.rank == 0 and folder.exists():
        shutil.rmtree(folder)  # a cell cut short: nothing of it is kept
    model.configure(cell.method, cell.budget, cell.settings, label)
    when = get_datetime_str(timezone="UTC")
    results = simple_evaluate(
        model=model,
        model_args=_model_args(grid, cell),
        tasks=source.get(),
        task_manager=source.manager,
        limit=grid.limit,
        gen_kwargs=f"max_new_tokens={grid.max_new_tokens}" if grid.max_new_tokens else None,
        log_samples=True,
        bootstrap_iters=0,
        datetime_str=when,
        verbosity="WARNING",
    )
    records = _gathered(model)
    if model.rank != 0:
        return
    records.sort(key=lambda r: (r["task"], r["doc_id"]))  # the same order however many processes answered
    rows = summarize(results, records, cell)
    _save_lmms_eval(results, folder, _model_args(grid, cell), when)
    (folder / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    mark = folder / f".{MARK}"
    mark.write_text(json.dumps({"config": _config(grid, cell, source), "rows": rows}, indent=1), encoding="utf-8")
    mark.replace(folder / MARK)  # at once: a cell is either marked done, with all its files, or not


def summarize(results: dict, records: list[dict], cell: Cell) -> list[dict]:
    """A row per task and metric of lmms-eval's results, with the means of the pipeline's numbers."""
    rows = []
    for task, counts in results["n-samples"].items():
        means = _means([r for r in records if r["task"] == task])
        for key, value in results["results"][task].items():
            metric, _, kind = key.partition(",")
            if not kind or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # the alias, standard errors, and what is not a number
            name = metric if kind == "none" else key
            head = {"task": task, "metric": name, "method": cell.method, "budget": cell.number, "value": float(value)}
            rows.append(head | {"n": counts["effective"]} | means)
    return rows


def _means(records: list[dict]) -> dict:
    def mean(key: str, scale: float = 1.0) -> float | None:
        values = [r[key] for r in records if r[key] is not None]
        return sum(values) / len(values) / scale if values else None

    return {
        "visual_full_mean": mean("visual_full"),
        "visual_kept_mean": mean("visual_kept"),
        "visual_layer_mean": mean("visual_layer_mean"),
        "ttft_s_mean": mean("ttft_s"),
        "prefill_tflops_mean": mean("prefill_flops", 1e12),
        "kv_bytes_mean": mean("kv_bytes"),
    }


def _model_args(grid: Grid, cell: Cell) -> str:
    """The cell as `--model_args` of lmms-eval's own command line."""
    amount = {} if cell.budget is None else {"budget": cell.budget.fraction, "tokens": cell.budget.tokens}
    pairs = {"pretrained": grid.model, "method": cell.method, **amount, "frames": grid.frames, **cell.settings}
    return ",".join(f"{key}={value}" for key, value in pairs.items() if value is not None)


def _config(grid: Grid, cell: Cell, source: Tasks) -> dict:
    """What a cell's results depend on (its method and budget are its folder's name): a cell done with
    other values is not reused."""
    fields = dict(model=grid.model, tasks=list(source.names), dataset=source.version, limit=grid.limit)
    fields |= dict(max_new_tokens=grid.max_new_tokens, random_weights=grid.random_weights, settings=cell.settings)
    return fields | ({"frames": grid.frames} if grid.frames is not None else {})  # cells of image sets: as before


def _done(grid: Grid, cell: Cell, source: Tasks) -> bool:
    """Whether the cell is done for these arguments; one done for others is an error, not overwritten."""
    if not (grid.output / cell.name / MARK).is_file():
        return False
    found, wanted = _marked(grid, cell)["config"], _config(grid, cell, source)
    if found != wanted:
        differ = ", ".join(
            f"{k}: {found.get(k)!r} there, {wanted[k]!r} now" for k in wanted if found.get(k) != wanted[k]
        )
        raise ExplorerError(
            f"{grid.output / cell.name} holds this cell for other arguments ({differ}); choose another --output "
            "or remove that folder"
        )
    return True


def _marked(grid: Grid, cell: Cell) -> dict:
    return json.loads((grid.output / cell.name / MARK).read_text(encoding="utf-8"))


def _shared(state: Accelerator, decide) -> list[str]:
    """What the first process decides (or the error it meets), the same for every process."""
    try:
        answer = [decide(), None] if state.process_index == 0 else [None, None]
    except ExplorerError as error:
        answer = [None, str(error)]
    if state.num_processes > 1:
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise ExplorerError(answer[1])
    return answer[0]


def _gathered(model: ExplorerModel) -> list[dict]:
    """Every process's records, on the first process (the others get an empty list)."""
    if model.world_size == 1:
        return list(model.records)
    parts = [None] * model.world_size if model.rank == 0 else None
    torch.distributed.gather_object(model.records, parts, dst=0)
    return [record for part in parts for record in part] if model.rank == 0 else []


def _save_lmms_eval(results: dict, folder: Path, model_args: str, when: str) -> None:
    """lmms-eval's own files, as its command line writes them: <date>_results.json and a samples file per task."""
    tracker = EvaluationTracker(output_path=str(folder))
    tracker.general_config_tracker.log_experiment_args(
        model_source="explorer", model_args=model_args, system_instruction=None, chat_template=None,
        fewshot_as_multiturn=False,
    )  # fmt: skip
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=when)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    if not any(folder.rglob("*_results.json")):  # lmms-eval logs a failure to save, and goes on
        raise ExplorerError(f"lmms-eval could not write its results to {folder}")


def _write(rows: list[dict], output: Path) -> None:
    summary, table = accuracy.write(rows, output)
    html, png = output / "summary.html", output / "summary.png"
    why = save_chart(accuracy.figure(rows), html, width=accuracy.width(rows))
    drawn = f", {html} and {png}" if why is None else f" and {html}; no PNG ({why})"
    print(accuracy.table(rows) + f"\n\nwrote {summary}, {table}{drawn}", flush=True)


def logs_to_stderr() -> None:
    """lmms-eval sends its log to stdout; the command keeps stdout for the summary."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
