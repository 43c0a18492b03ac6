"""`python -m explorer bench`: methods x budgets on one image or video clip, each against the unreduced run and
against the floor, the same model fed exactly as many visual tokens with no selection work at all
(`uniform`: no signal captured, nothing scored). A method's TTFT over its floor is the overhead it costs.
"As many" is the mean over the LLM's layers, rounded: the tokens kept for a method before the LLM, about
its budget for one that prunes inside it (whose budget is that mean), so that the floor does the same
LLM work; a method's own first pass (GemFilter's) is part of its overhead.

Every run generates exactly `max_new_tokens` tokens; warm-up runs are not measured; each time is the
median over `repeats` runs, and the TTFT's min and max give its spread. The vision stage's FLOPs, the
LLM prefill's FLOPs and the KV-cache bytes are computed from the config and the real token counts
(`Result.cost`), never measured. The selection's share of the TTFT is the median selection time over the
median TTFT. On a clip (`video.Clip`) every row also has the tokens kept of each frame or temporal group.
"""

from __future__ import annotations

import csv
import functools
import statistics
from dataclasses import dataclass

from ..core import Budget, ExplorerError
from ..engine import fidelity
from ..engine.pipeline import run, run_batch
from ..methods import METHODS
from ..views import stages, style

TIMES = ("ttft_s", "prefill_s", "decode_tokens_per_s", "total_s", "preprocess_s", "vision_s", "selection_s")
DRIFT = ("logprob_diff", "kl", "first_divergence")  # on the unreduced run's answer, see fidelity.drift
COLUMNS = ("model", "size", "batch", "method", "budget", "visual_kept", "visual_full", "visual_layer_mean", *TIMES)
COLUMNS += ("ttft_min_s", "ttft_max_s", "images_per_s", "peak_bytes", "vision_tflops", "prefill_tflops", "kv_bytes")
COLUMNS += ("ttft_ratio", "peak_ratio", "floor_ttft_s", "over_floor", *DRIFT, "answer", "selection_share")
COLUMNS += ("frames", "by_frame")  # a clip's: frames sampled, and "kept/full" of each frame or temporal group


def sweep(
    backend,
    image,
    prompt: str,
    methods: list[str],
    budgets: list[Budget],
    max_new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    done: dict | None = None,
    progress=None,
    batch: int = 1,
    floor: bool = False,
) -> list[dict]:
    """One row per (method, budget), the unreduced run first; ratios and drift are to the unreduced run.
    With `floor`, each row also gets the TTFT of `uniform` keeping as many tokens (its floor).
    `batch` > 1 runs that many copies of the image in one generate() call (no drift then).

    The cells take turns: every round runs each cell once, so a slow spell of the machine falls on all
    of them alike; the first `warmup` rounds are not measured. `done` maps (method, budget as text,
    batch) to rows measured before, which are reused (the app's cache); `progress(i, n, method,
    budget)` is called before each run."""
    done = {} if done is None else done
    cells = [("none", Budget(fraction=1.0))] + [(m, b) for m in methods if m != "none" for b in budgets]
    grid = _Grid(batch, floor)
    order = [cell for cell in cells if grid.key(*cell) not in done]
    reused = dict.fromkeys(grid.under(done[grid.key(*cell)]) for cell in cells if grid.key(*cell) in done)  # floors
    order += [cell for cell in reused if cell and grid.key(*cell) not in done]
    options = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    measure = functools.partial(_one, backend, image, prompt, batch, options)
    results, failed = _rounds(grid, order, done, warmup + repeats, warmup, measure, progress)
    for cell, measured in results.items():
        method, budget, _ = grid.key(*cell)
        if cell in failed:  # a row with only the reason
            done[grid.key(*cell)] = dict.fromkeys(COLUMNS) | {"method": method, "budget": budget, "batch": batch}
            done[grid.key(*cell)]["answer"] = failed[cell]
        else:
            done[grid.key(*cell)] = _row(method, budget, measured, batch)
    rows = [done[grid.key(*cell)] for cell in cells]
    if batch == 1:
        _drift(backend, image, prompt, rows, cells)
    _ratios(grid, rows, done)
    return rows


@dataclass(frozen=True)
class _Grid:
    """How a sweep names its cells and finds their floors."""

    batch: int
    floor: bool

    def key(self, method: str, budget: Budget) -> tuple:
        """A cell's key in `done`: (method, budget as text, batch)."""
        return method, "-" if method == "none" else str(budget), self.batch

    def under(self, row: dict) -> tuple | None:
        """The floor's cell of a row, when it drops anything: `uniform` keeping the row's mean visual tokens
        per LLM layer, rounded."""
        mean = row["visual_layer_mean"]
        k = None if mean is None else max(1, round(mean))
        return None if not self.floor or k is None or k == row["visual_full"] else ("uniform", Budget(tokens=k))


def _one(backend, image, prompt: str, batch: int, options: dict, method: str, budget: Budget):
    """One measured run of a cell: a `Result`, or a `Batch` of copies of the image."""
    if batch == 1:
        return run(backend, image, prompt, method, budget, **options)
    return run_batch(backend, [image] * batch, prompt, method, budget, **options)


def _rounds(grid: _Grid, order: list, done: dict, rounds: int, warmup: int, measure, progress):
    """Every cell of `order` measured once a round, the first `warmup` rounds unmeasured; the floors found
    in round 0 are appended to `order`. Returns each cell's measured results, and the cells that could not
    run (out of memory, or a budget the method cannot meet) with the reason."""
    results, failed = {cell: [] for cell in order}, {}
    for round in range(rounds):
        for i, (method, budget) in enumerate(order):  # round 0 appends the floors as it finds them
            if (method, budget) in failed:
                continue
            if progress:
                progress(round * len(order) + i, rounds * len(order), method, budget)
            try:
                result = measure(method, budget)
            except ExplorerError as error:  # out of memory, a budget too low: its row says so, the others run
                failed[method, budget] = str(error)
                continue
            if round >= warmup:
                results[method, budget].append(result)
            tokens = result.tokens if grid.batch == 1 else result.tokens[0]
            floor_cell = grid.under(tokens | {"visual_layer_mean": statistics.mean(tokens["visual_per_layer"])})
            if round == 0 and floor_cell and floor_cell not in results and grid.key(*floor_cell) not in done:
                order.append(floor_cell)
                results[floor_cell] = []
    return results, failed


def _ratios(grid: _Grid, rows: list[dict], done: dict) -> None:
    """Each row's TTFT and peak memory over the unreduced run's (rows[0]), and its TTFT over its floor's;
    the floors' own rows get theirs too."""
    floors = [done[grid.key(*cell)] for cell in dict.fromkeys(grid.under(row) for row in rows) if cell]
    for row in rows + [row for row in floors if row not in rows]:
        row["ttft_ratio"] = _ratio(row["ttft_s"], rows[0]["ttft_s"])
        row["peak_ratio"] = _ratio(row["peak_bytes"], rows[0]["peak_bytes"])
        row["floor_ttft_s"] = row["over_floor"] = None
        if grid.floor and row["visual_kept"] is not None:
            base = rows[0] if grid.under(row) is None else done[grid.key(*grid.under(row))]
            row["floor_ttft_s"], row["over_floor"] = base["ttft_s"], _ratio(row["ttft_s"], base["ttft_s"])


def _row(method: str, budget: str, results: list, batch: int) -> dict:
    """The row of one cell from its measured runs: medians, the TTFT's min and max, and the costs."""
    tokens, answer = (
        (results[0].tokens, results[0].answer) if batch == 1 else (results[0].tokens[0], results[0].answers[0])
    )
    row = {"batch": batch, "method": method, "budget": budget} | {k: tokens[k] for k in ("visual_kept", "visual_full")}
    row["visual_layer_mean"] = statistics.mean(tokens["visual_per_layer"])
    for name in TIMES:
        values = [r.timing[name] for r in results if r.timing[name] is not None]
        row[name] = statistics.median(values) if values else None
    ttfts = [r.timing["ttft_s"] for r in results]
    row["ttft_min_s"], row["ttft_max_s"], row["images_per_s"] = min(ttfts), max(ttfts), batch / row["total_s"]
    row["selection_share"] = row["selection_s"] / row["ttft_s"]
    parts = tokens.get("by_frame", [])
    row["by_frame"] = " ".join(f"{part['kept']}/{part['full']}" for part in parts) or None
    row["peak_bytes"] = int(statistics.median(r.memory["peak_bytes"] for r in results))
    cost = results[0].cost
    row["vision_tflops"], row["prefill_tflops"] = cost["vision_flops"] / 1e12, cost["prefill_flops"] / 1e12
    row["kv_bytes"] = cost["kv_bytes"]
    row |= dict.fromkeys(DRIFT) | {"answer": answer}
    if batch == 1:
        row["answer_ids"] = results[0].answer_ids  # the unreduced row's are what the others' drift is measured on
    return row


def _drift(backend, image, prompt, rows: list[dict], cells: list) -> None:
    """Fill in each row's drift on the unreduced run's answer (rows[0]), where it is missing."""
    reference = rows[0].get("answer_ids")
    missing = [(row, cell) for row, cell in zip(rows, cells) if row["kl"] is None and row["ttft_s"] is not None]
    if reference is None or not missing:
        return
    try:
        theirs = fidelity.logprobs(backend, image, prompt, reference)
    except ExplorerError:  # the unreduced answer cannot be scored (a random-weight model's gibberish): no drift
        return
    for row, (method, budget) in missing:
        mine = theirs if method == "none" else fidelity.logprobs(backend, image, prompt, reference, method, budget)
        row |= {k: v for k, v in fidelity.drift(mine, theirs, reference).items() if k in DRIFT}


def _ratio(a, b) -> float | None:
    return None if a is None or b is None else a / b


PLOTS = {  # what a sweep can plot against the kept tokens: column -> axis title
    "ttft_s": "time to first token (s)",
    "peak_bytes": "peak memory (bytes)",
    "kl": "KL(full || reduced) per token on the full answer",
    "logprob_diff": "log-prob/token of the full answer, reduced - full",
    "decode_tokens_per_s": "decode (tokens/s)",
    "prefill_s": "prefill (s)",
    "vision_tflops": "vision encoder and projector (TFLOPs, from the config)",
    "prefill_tflops": "LLM prefill (TFLOPs, from the config)",
    "kv_bytes": "KV cache of the prompt while decoding (bytes)",
    "images_per_s": "images/s",
}


AXIS = "visual tokens per LLM layer, mean (of {})"  # the kept tokens for a method before the LLM


def grid_floor(row: dict) -> tuple[float, float]:
    """(x, y) of a row's floor on a chart: its tokens, as the row's mean rounded, and its TTFT."""
    return max(1, round(row["visual_layer_mean"])), row["floor_ttft_s"]


def figure(rows: list[dict], column: str = "ttft_s"):
    """A plotly chart of one column against the visual tokens kept: a line per method, the
    unreduced run as a reference line and, for the TTFT when measured, the floor."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for trace in traces(rows, column):
        figure.add_trace(trace)
    reference = next(r for r in rows if r["method"] == "none")
    if reference[column] is not None:
        figure.add_hline(
            y=reference[column], line_dash="dot", annotation_text="unreduced", annotation_position="top left"
        )
    figure.update_layout(
        xaxis_title=AXIS.format(_full(rows)),
        yaxis_title=PLOTS.get(column, column),
        legend=dict(orientation="h", y=-0.25),
        margin=dict(l=60, r=20, t=30, b=40),
        height=420,
    )
    return figure


def traces(rows: list[dict], column: str, legend: bool = True) -> list:
    """The lines of `figure`: one per method, and the floor's under the TTFT."""
    import plotly.colors
    import plotly.graph_objects as go

    lines = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        mine = sorted(
            (r for r in rows if r["method"] == method and r[column] is not None), key=lambda r: r["visual_layer_mean"]
        )
        x, y = [r["visual_layer_mean"] for r in mine], [r[column] for r in mine]
        text = [f"budget {r['budget']}" for r in mine]
        colours = plotly.colors.qualitative.Dark24  # a method keeps its colour in every chart
        line = dict(color=colours[list(METHODS).index(method) % len(colours)])
        lines.append(go.Scatter(x=x, y=y, name=method, text=text, line=line, legendgroup=method, showlegend=legend))
    floors = sorted({grid_floor(r) for r in rows if r.get("floor_ttft_s") is not None})
    if column == "ttft_s" and floors:
        x, y = zip(*floors)
        style = dict(color="black", dash="dash")
        lines.append(
            go.Scatter(
                x=x, y=y, name="floor (k tokens, no selection)", line=style, legendgroup="floor", showlegend=legend
            )
        )
    return lines


def charts(groups: dict[str, list[dict]], columns=("ttft_s", "peak_bytes", "vision_tflops", "prefill_tflops")):
    """One plotly figure for a whole bench: a row of charts (`columns` against the tokens kept, then where
    each cell's time went) per group of rows (model, image size, batch)."""
    from plotly.subplots import make_subplots

    titles = [f"{name}: {title}" for name in groups for title in [*(PLOTS[c] for c in columns), WHERE]]
    figure = make_subplots(rows=len(groups), cols=len(columns) + 1, subplot_titles=titles, horizontal_spacing=0.06)
    for i, rows in enumerate(groups.values(), 1):
        reference = next(r for r in rows if r["method"] == "none")
        for j, column in enumerate(columns, 1):
            for trace in traces(rows, column, legend=i == j == 1):
                figure.add_trace(trace, row=i, col=j)
            if reference[column] is not None:
                figure.add_hline(y=reference[column], line_dash="dot", row=i, col=j)
            figure.update_xaxes(title_text=AXIS.format(_full(rows)), row=i, col=j)
        for bar in stage_bars(rows, legend=i == 1):
            figure.add_trace(bar, row=i, col=len(columns) + 1)
    figure.update_annotations(font_size=11)
    entries = sum(trace.showlegend is not False for trace in figure.data)  # the legend needs ~20 px each
    height = max(360 * len(groups) + 60, 20 * entries + 100)
    legend = dict(tracegroupgap=0, font=dict(size=11))  # every method is its own group: no gaps
    size = dict(height=height, width=520 * (len(columns) + 1) + 160, margin=dict(t=60, b=40))
    figure.update_layout(**size, legend=legend, barmode="stack")
    return figure


WHERE = "where the time goes (s, medians)"


def stage_bars(rows: list[dict], legend: bool = True) -> list:
    """Stacked bars of where each measured cell's time went (`views.stages`: preprocessing, vision encoder,
    selection, LLM prefill, decode; from its medians): one bar per method and budget, a trace per stage."""
    import plotly.graph_objects as go

    rows = [r for r in rows if r["ttft_s"] is not None and r["preprocess_s"] is not None]
    labels = [f"{r['method']} {r['budget']}" for r in rows]
    parts = [stages.split(r) for r in rows]
    return [
        go.Bar(x=labels, y=[p[stage] for p in parts], name=stage, marker_color=style.css(style.STAGE[stage]),
               legendgroup=stage, showlegend=legend)
        for stage in stages.STAGES
    ]  # fmt: skip


def _full(rows: list[dict]) -> int | None:
    """The image's visual tokens, from any row that was measured."""
    return next((r["visual_full"] for r in rows if r["visual_full"] is not None), None)


HEAD = ("method", "budget", "kept/full", "per layer", "TTFT s", "spread", "x full", "x floor", "vision s", "prefill s")
HEAD += ("decode tok/s", "total s", "select ms", "select %", "vision TFLOPs", "LLM TFLOPs", "KV MiB", "peak MiB")
HEAD += ("x full", "img/s")
HEAD += ("logp diff", "KL", "parts at")


def cells(rows: list[dict]) -> list[list[str]]:
    """The rows as text, one entry per HEAD column; a cell that failed says why in its kept column."""

    def text(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    def failed(r: dict) -> list[str]:
        return [r["method"], r["budget"], r["answer"], *["-"] * (len(HEAD) - 3)]

    return [
        failed(r)
        if r["ttft_s"] is None
        else [
            r["method"],
            r["budget"],
            f"{r['visual_kept']}/{r['visual_full']}",
            f"{r['visual_layer_mean']:.0f}",
            f"{r['ttft_s']:.3f}",
            f"{r['ttft_max_s'] - r['ttft_min_s']:.3f}",
            text(r["ttft_ratio"], ".2f"),
            text(r.get("over_floor"), ".2f"),
            f"{r['vision_s']:.3f}",
            f"{r['prefill_s']:.3f}",
            text(r["decode_tokens_per_s"], ".1f"),
            f"{r['total_s']:.3f}",
            f"{r['selection_s'] * 1e3:.2f}",
            f"{r['selection_share'] * 100:.2f}",
            f"{r['vision_tflops']:.3g}",
            f"{r['prefill_tflops']:.3g}",
            f"{r['kv_bytes'] / 2**20:.1f}",
            f"{r['peak_bytes'] / 2**20:.0f}",
            text(r["peak_ratio"], ".2f"),
            f"{r['images_per_s']:.2f}",
            text(r["logprob_diff"], "+.3f"),
            text(r["kl"], ".4f"),
            text(r["first_divergence"], "d"),
        ]
        for r in rows
    ]


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table; a cell that failed says "see (i)" in its kept column, and why
    under the table, where a sentence does not widen a column."""
    lines, notes = [list(HEAD)], []
    for line, r in zip(cells(rows), rows):
        if r["ttft_s"] is None:
            notes.append(f"({len(notes) + 1}) {r['method']} {r['budget']}: {r['answer']}")
            line[2] = f"see ({len(notes)})"
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEAD))]
    aligned = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join(aligned + ([""] + notes if notes else []))


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
