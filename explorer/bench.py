"""`python -m explorer bench`: methods x budgets on one image, each against the unreduced run.

Every run generates exactly `max_new_tokens` tokens; warm-up runs are not measured; each number is
the median over `repeats` runs.
"""

from __future__ import annotations

import csv
import statistics

from . import fidelity
from .core import Budget
from .pipeline import run

TIMES = ("ttft_s", "prefill_s", "decode_tokens_per_s", "total_s", "selection_s")
DRIFT = ("logprob_diff", "kl", "first_divergence")  # on the unreduced run's answer, see fidelity.drift
COLUMNS = ("method", "budget", "visual_kept", "visual_full", "visual_layer_mean", *TIMES, "peak_bytes", "ttft_ratio")
COLUMNS += ("peak_ratio", *DRIFT)
COLUMNS += ("answer",)


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
) -> list[dict]:
    """One row per (method, budget), the unreduced run first; ratios and drift are to the unreduced run.

    `done` maps (method, budget as text) to rows measured before, which are reused (the app's cache);
    `progress(i, n, method, budget)` is called before each cell is measured."""
    done = {} if done is None else done
    cells = [("none", Budget(fraction=1.0))] + [(m, b) for m in methods if m != "none" for b in budgets]
    reference = {}  # the unreduced answer and its log-probabilities
    rows = []
    for i, (method, budget) in enumerate(cells):
        key = (method, "-" if method == "none" else str(budget))
        if key not in done:
            if progress:
                progress(i, len(cells), method, budget)
            done[key] = measure(backend, image, prompt, method, budget, max_new_tokens, repeats, warmup, reference)
        rows.append(done[key])
    for row in rows:
        row["ttft_ratio"] = row["ttft_s"] / rows[0]["ttft_s"]
        row["peak_ratio"] = row["peak_bytes"] / rows[0]["peak_bytes"]
    return rows


def measure(backend, image, prompt, method, budget, max_new_tokens, repeats, warmup, reference: dict) -> dict:
    """The row of one cell: medians of `repeats` runs after `warmup`, and the drift on the unreduced
    answer in `reference` (filled by the first call, which must be the unreduced run)."""
    options = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    results = [run(backend, image, prompt, method, budget, **options) for _ in range(warmup + repeats)][warmup:]
    row = {"method": method, "budget": str(budget) if method != "none" else "-"}
    for key in ("visual_kept", "visual_full", "visual_layer_mean"):
        row[key] = results[0].tokens[key]
    for key in TIMES:
        values = [r.timing[key] for r in results if r.timing[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["peak_bytes"] = int(statistics.median(r.memory["peak_bytes"] for r in results))
    if not reference:
        answer = results[0].answer_ids
        reference.update(answer=answer, logprobs=fidelity.logprobs(backend, image, prompt, answer))
    mine = fidelity.logprobs(backend, image, prompt, reference["answer"], method, budget)
    row.update(
        {k: v for k, v in fidelity.drift(mine, reference["logprobs"], reference["answer"]).items() if k in DRIFT}
    )
    row["answer"] = results[0].answer
    return row


PLOTS = {  # what a sweep can plot against the kept tokens: column -> axis title
    "ttft_s": "time to first token (s)",
    "peak_bytes": "peak memory (bytes)",
    "kl": "KL(full || reduced) per token on the full answer",
    "logprob_diff": "log-prob/token of the full answer, reduced - full",
    "decode_tokens_per_s": "decode (tokens/s)",
    "prefill_s": "prefill (s)",
}


def figure(rows: list[dict], column: str = "ttft_s"):
    """A plotly chart of one column against the visual tokens kept: a line per method, the
    unreduced run as a reference line."""
    import plotly.graph_objects as go

    figure = go.Figure()
    reference = next(r for r in rows if r["method"] == "none")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["visual_kept"])
        text = [f"budget {r['budget']}" for r in mine]
        figure.add_scatter(x=[r["visual_kept"] for r in mine], y=[r[column] for r in mine], name=method, text=text)
    figure.add_hline(y=reference[column], line_dash="dot", annotation_text="unreduced", annotation_position="top left")
    figure.update_layout(
        xaxis_title=f"visual tokens kept (of {reference['visual_full']})",
        yaxis_title=PLOTS.get(column, column),
        legend=dict(orientation="h", y=-0.25),
        margin=dict(l=60, r=20, t=30, b=40),
        height=420,
    )
    return figure


HEAD = ("method", "budget", "kept/full", "per layer", "TTFT s", "x full", "prefill s", "decode tok/s", "total s")
HEAD += ("select ms",)
HEAD += ("peak MiB", "x full", "logp diff", "KL", "parts at")


def cells(rows: list[dict]) -> list[list[str]]:
    """The rows as text, one entry per HEAD column."""
    return [
        [
            r["method"],
            r["budget"],
            f"{r['visual_kept']}/{r['visual_full']}",
            f"{r['visual_layer_mean']:.0f}",
            f"{r['ttft_s']:.3f}",
            f"{r['ttft_ratio']:.2f}",
            f"{r['prefill_s']:.3f}",
            f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-",
            f"{r['total_s']:.3f}",
            f"{r['selection_s'] * 1e3:.2f}",
            f"{r['peak_bytes'] / 2**20:.0f}",
            f"{r['peak_ratio']:.2f}",
            f"{r['logprob_diff']:+.3f}",
            f"{r['kl']:.4f}",
            "-" if r["first_divergence"] is None else str(r["first_divergence"]),
        ]
        for r in rows
    ]


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    lines = [list(HEAD), *cells(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEAD))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
