"""Accuracy at a budget, as `python -m explorer eval` writes it: the rows of summary.json, their CSV, and the
chart of each task's metric against the visual tokens kept, one line per method, the unreduced model as
the reference. The app's Accuracy tab reads the same rows (no lmms-eval needed for that)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..core import ExplorerError

COLUMNS = ("task", "metric", "method", "budget", "value", "n", "visual_full_mean", "visual_kept_mean")
COLUMNS += ("visual_layer_mean", "ttft_s_mean", "prefill_tflops_mean", "kv_bytes_mean")
AXES = {  # what the chart can put on its x axis
    "visual_kept_mean": "visual tokens kept (mean per question)",
    "visual_layer_mean": "visual tokens per LLM layer (mean per question)",
    "prefill_tflops_mean": "LLM prefill TFLOPs (mean per question)",
}


def read(path: str | Path) -> list[dict]:
    """The rows of a summary.json, checked: one clear error for a file that is not one."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExplorerError(f"{Path(path).name} is not a summary.json of `python -m explorer eval`: {error}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ExplorerError(f"{Path(path).name} is not a summary.json: it must be a non-empty JSON list of rows")
    for row in rows:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ExplorerError(f"{Path(path).name}: a row lacks {', '.join(missing)}, so it is not a summary.json")
    return rows


def write(rows: list[dict], folder: str | Path) -> tuple[Path, Path]:
    """summary.json and summary.csv in `folder`."""
    folder = Path(folder)
    summary, table = folder / "summary.json", folder / "summary.csv"
    summary.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    with open(table, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return summary, table


def cells(rows: list[dict]) -> list[list]:
    """The rows as a table for people: numbers rounded, FLOPs in TFLOPs, KV in MiB."""

    def shown(value, digits: int):
        return "-" if value is None else round(value, digits)

    return [
        [r["task"], r["metric"], r["method"], r["budget"], shown(r["value"], 4), r["n"]]
        + [shown(r["visual_full_mean"], 1), shown(r["visual_kept_mean"], 1), shown(r["visual_layer_mean"], 1)]
        + [shown(r["ttft_s_mean"], 4), shown(r["prefill_tflops_mean"], 4)]
        + [shown(None if r["kv_bytes_mean"] is None else r["kv_bytes_mean"] / 2**20, 2)]
        for r in rows
    ]


HEADERS = ["task", "metric", "method", "budget", "value", "n", "visual full", "visual kept", "per layer"]
HEADERS += ["TTFT s", "prefill TFLOPs", "KV MiB"]


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in cells(rows)])


def figure(rows: list[dict], x: str = "visual_kept_mean"):
    """Each task's metric against `x` (see AXES): a chart per (task, metric), a line per method with its
    budgets as points, the unreduced model (method `none`) as a dotted line and a point."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if x not in AXES:
        raise ExplorerError(f"the chart's x axis is one of {', '.join(AXES)}, not {x!r}")
    pairs = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    columns = min(2, len(pairs))
    count = math.ceil(len(pairs) / columns)
    titles = [f"{task}: {metric}" for task, metric in pairs]
    chart = make_subplots(rows=count, cols=columns, subplot_titles=titles, horizontal_spacing=0.1)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    for i, (task, metric) in enumerate(pairs):
        where = dict(row=i // columns + 1, col=i % columns + 1)
        mine = [r for r in rows if (r["task"], r["metric"]) == (task, metric)]
        for full in (r for r in mine if r["method"] == "none"):
            chart.add_hline(y=full["value"], line_dash="dot", line_color="grey", **where)
            chart.add_trace(_trace(go, [full], "none (unreduced)", "grey", x, i == 0), **where)
        for j, method in enumerate(methods):
            line = sorted((r for r in mine if r["method"] == method), key=lambda r: r[x] or 0)
            if line:
                chart.add_trace(_trace(go, line, method, _colour(j), x, i == 0), **where)
        chart.update_xaxes(title_text=AXES[x], **where)
        chart.update_yaxes(title_text=metric, **where)
    chart.update_layout(height=380 * count + 80, margin=dict(t=60, b=40))  # as wide as where it is shown
    return chart


def width(rows: list[dict]) -> int:
    """Pixels across for the chart of these rows as a picture: two charts a row at most."""
    return 560 * min(2, len({(r["task"], r["metric"]) for r in rows})) + 180


def _trace(go, rows: list[dict], name: str, colour: str, x: str, legend: bool):
    return go.Scatter(
        x=[r[x] for r in rows],
        y=[r["value"] for r in rows],
        mode="lines+markers",
        name=name,
        legendgroup=name,
        showlegend=legend,
        line=dict(color=colour),
        text=[f"{name} at {r['budget']:g}: {r['value']:.4g} (n={r['n']})" for r in rows],
        hoverinfo="text",
    )


def _colour(i: int) -> str:
    import plotly.express as px

    palette = px.colors.qualitative.Plotly
    return palette[i % len(palette)]
