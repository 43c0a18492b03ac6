"""Accuracy: a `summary.json` of `python -m explorer eval` (uploaded, or picked from `--eval-dir`): each
benchmark's metric against the visual tokens kept, a line per method, the unreduced model dotted."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import gradio as gr

from explorer.evaluation import accuracy

from .request import shows_errors


class Accuracy(NamedTuple):
    folder: str | None  # --eval-dir: where `python -m explorer eval` wrote its summaries (server side only)
    found: gr.Dropdown
    upload: gr.File
    x: gr.Dropdown
    plot: gr.Plot
    table: gr.Dataframe
    rows: gr.State  # the rows behind the plot


def build(eval_dir: str | None) -> Accuracy:
    gr.Markdown(
        "Accuracy on a benchmark against the visual tokens kept, a line per method, the unreduced model dotted: "
        "the `summary.json` of `python -m explorer eval` (see docs/EVAL.md)."
    )
    found = summaries(eval_dir)
    with gr.Row():
        picked = gr.Dropdown(found, value=found[0] if found else None, label=f"In {eval_dir}", visible=bool(eval_dir))
        upload = gr.File(label="Or upload a summary.json", file_types=[".json"], type="filepath")
        x = gr.Dropdown([(t, k) for k, t in accuracy.AXES.items()], value="visual_kept_mean", label="Against")
    plot = gr.Plot(label="Accuracy against the visual tokens kept")
    table = gr.Dataframe(headers=accuracy.HEADERS, interactive=False, wrap=True)
    return Accuracy(eval_dir, picked, upload, x, plot, table, gr.State([]))


def summaries(eval_dir: str | None) -> list[str]:
    """Every summary.json under `eval_dir`, as paths relative to it."""
    if not eval_dir or not Path(eval_dir).is_dir():
        return []
    return sorted(str(path.relative_to(eval_dir)) for path in Path(eval_dir).rglob("summary.json"))


@shows_errors
def shown_summary(path: str | None, x: str) -> tuple:
    """The chart, the table and the rows of a summary.json (None: nothing to show)."""
    if not path:
        return None, [], []
    rows = accuracy.read(path)
    return accuracy.figure(rows, x), accuracy.cells(rows), rows


def wire(demo: gr.Blocks, tab: Accuracy) -> None:
    def found(name: str | None, x: str):  # a name from the list, never a path a visitor makes up
        known = summaries(tab.folder)
        return shown_summary(str(Path(tab.folder) / name) if name in known else None, x)

    def axis(x: str, rows: list):
        return accuracy.figure(rows, x) if rows else None

    shown = [tab.plot, tab.table, tab.rows]
    tab.found.change(found, [tab.found, tab.x], shown, api_name="accuracy")
    tab.upload.upload(shown_summary, [tab.upload, tab.x], shown, api_name="accuracy_upload")
    tab.x.change(axis, [tab.x, tab.rows], tab.plot, api_name="accuracy_axis")
    demo.load(found, [tab.found, tab.x], shown, api_name="accuracy_first")
