"""Pictures, charts and tables of one run, drawn on the user's own image.

Every visual token has a pixel box on the original image (`Geometry.boxes`), so the overlays are
exact: a token's patch is greyed, darkened and hatched when it was dropped, and left untouched when
it was kept, so kept and dropped read apart on dark, bright and busy images alike. The look (colours,
hatching) is `style`'s, which the browser's picture draws with too. Plain numpy and PIL; plotly is
imported only when a chart is drawn.
"""

from __future__ import annotations

import html
import inspect
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from backends import signals
from backends.errors import first_line

from ..core import Geometry, Selection
from ..methods import METHODS
from . import style
from .style import DIM, HATCH, HEAT_UNDER, KEPT, ONLY_A, ONLY_B, TINT, hatch_step, palette

DISPLAY = 2048  # longest side of the pictures, in pixels; smaller images keep their size
LUMA = np.array(style.LUMA, dtype=np.float32)
SCALE = np.array(style.INFERNO, dtype=np.float32)  # the colours of scores, dark to bright


def views(g: Geometry) -> dict[str, torch.Tensor]:
    """The token sets drawn as one picture each: the thumbnail and the crops when the model has both,
    else every token that has a box. Newline tokens have none."""
    boxed = ~torch.isnan(g.boxes[:, 0])
    base = -1 if g.thumbnail is None else g.thumbnail
    crops = boxed & (g.partition != base)
    if base < 0 or not crops.any():
        return {"image": boxed.nonzero()[:, 0]}
    return {"thumbnail": g.members(base), "crops": crops.nonzero()[:, 0]}


def display_size(g: Geometry) -> tuple[int, int]:
    width, height = g.image_size
    scale = min(1.0, DISPLAY / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def labels(g: Geometry, tokens: torch.Tensor) -> np.ndarray:
    """(H, W) int64 map of which token covers each pixel of the displayed image, -1 where none."""
    width, height = display_size(g)
    scale = torch.tensor([width, height, width, height]) / torch.tensor(g.image_size * 2)
    boxes = (g.boxes[tokens] * scale).round().long().tolist()  # (T, 4) as x0, y0, x1, y1
    out = np.full((height, width), -1, dtype=np.int64)
    for token, (x0, y0, x1, y1) in zip(tokens.tolist(), boxes):
        out[y0:y1, x0:x1] = token
    return out


def overlay(image: Image.Image, g: Geometry, selection: Selection, tokens: torch.Tensor) -> Image.Image:
    """The image with the patches of `tokens` that were dropped greyed, darkened and hatched, and a line
    around the kept ones (drawn on the dropped side, so kept pixels stay exactly as they were). Merged
    patches are tinted with their group's colour instead of hatched, and the kept token they went into
    is outlined in it."""
    picture = np.asarray(image.convert("RGB").resize(display_size(g)), dtype=np.float32)
    label = labels(g, tokens)
    kept = np.zeros(len(g) + 1, dtype=bool)  # the extra last entry stands for "no token" (label -1)
    kept[selection.keep.cpu().numpy()] = True
    dropped = (label >= 0) & ~kept[label]
    out = picture.copy()
    out[dropped] = dimmed(picture[dropped])

    colour = np.tile(np.array(KEPT, dtype=np.float32), (len(g) + 1, 1))  # (N + 1, 3) line colour by kept token
    merged = np.zeros_like(dropped)
    if selection.groups is not None:
        groups = selection.groups.cpu().numpy()
        into = np.append(groups, -1)[label]  # (H, W) the token each pixel's token went into
        targets = np.unique(groups[groups >= 0])
        colour[targets] = palette(len(targets))
        merged = dropped & (into >= 0)
        out[merged] = (1 - TINT) * out[merged] + TINT * colour[into[merged]]
    out[dropped & ~merged & hatch(label.shape)] = HATCH

    # a dropped pixel next to a kept one, in any of the four directions, gets the line of that kept token
    pad = np.pad(label, 1, constant_values=-1)
    for near in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]):
        edge = dropped & kept[near] & (near >= 0)
        out[edge] = colour[near[edge]]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def dimmed(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) the pixels of a dropped patch: grey, at DIM of their brightness."""
    return np.repeat((pixels @ LUMA)[..., None] * DIM, 3, axis=-1)


def hatch(shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels on the diagonal hatch lines, one line every `hatch_step` pixels, `hatch_width` wide."""
    every = hatch_step(shape)
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (x + y) % every < style.hatch_width(every)


def agreement(image: Image.Image, g: Geometry, keep_a: torch.Tensor, keep_b: torch.Tensor, tokens: torch.Tensor):
    """Two methods' choices on one picture: kept by both untouched, by one tinted with its colour
    (ONLY_A, ONLY_B), by neither greyed and darkened. Returns the picture and the four counts."""
    picture = np.asarray(image.convert("RGB").resize(display_size(g)), dtype=np.float32)
    label = labels(g, tokens)
    a, b = np.zeros(len(g) + 1, dtype=bool), np.zeros(len(g) + 1, dtype=bool)
    a[keep_a.cpu().numpy()], b[keep_b.cpu().numpy()] = True, True
    covered = label >= 0
    out = picture.copy()
    for only, colour in ((a & ~b, ONLY_A), (b & ~a, ONLY_B)):
        where = covered & only[label]
        out[where] = 0.45 * out[where] + 0.55 * np.array(colour, dtype=np.float32)
    neither = covered & ~a[label] & ~b[label]
    out[neither] = dimmed(picture[neither])
    shown = tokens.numpy()
    counts = {
        "both": int((a[shown] & b[shown]).sum()),
        "only A": int((a[shown] & ~b[shown]).sum()),
        "only B": int((b[shown] & ~a[shown]).sum()),
        "neither": int((~a[shown] & ~b[shown]).sum()),
    }
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8)), counts


def colours(t: np.ndarray) -> np.ndarray:
    """(..., 3) colours of t in [0, 1] along SCALE."""
    x = np.clip(t, 0, 1) * (len(SCALE) - 1)
    i = np.minimum(x.astype(int), len(SCALE) - 2)
    f = (x - i)[..., None]
    return SCALE[i] * (1 - f) + SCALE[i + 1] * f


def heatmap(image: Image.Image, g: Geometry, scores: torch.Tensor, tokens: torch.Tensor) -> Image.Image:
    """The scores of `tokens` as colours over the image, with a colour scale below it.

    Colours follow each token's rank among the tokens shown: a top-k method keeps the brightest
    patches whatever the spread of the values, and a few outliers cannot wash the rest out. They lie
    over a grey copy of the image lifted into the middle of the brightness range (`underlay`), so they
    look the same, and keep their contrast, on a dark image as on a bright one."""
    picture = np.asarray(image.convert("RGB").resize(display_size(g)), dtype=np.float32)
    values = scores.detach().float().cpu()
    shown = tokens[~torch.isnan(values[tokens])]
    rank = torch.full((len(g) + 1,), math.nan)
    if len(shown):
        order = values[shown].argsort(stable=True)
        rank[shown[order]] = torch.linspace(0, 1, len(shown)) if len(shown) > 1 else torch.ones(1)
    label = labels(g, shown)
    t = rank.numpy()[label]  # NaN where no score
    heat = ~np.isnan(t)
    out = picture.copy()
    out[heat] = HEAT_UNDER * underlay(picture[heat]) + (1 - HEAT_UNDER) * colours(t[heat])
    low, mid, high = values[shown].quantile(torch.tensor([0.0, 0.5, 1.0])).tolist() if len(shown) else [0, 0, 0]
    return _with_scale(Image.fromarray(out.round().clip(0, 255).astype(np.uint8)), low, mid, high)


def underlay(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) the image under a heatmap: grey, its brightness mapped from 0..255 into 64..191 (`style.UNDERLAY`)."""
    base, slope = style.UNDERLAY
    return np.repeat(base + slope * (pixels @ LUMA)[..., None], 3, axis=-1)


def _with_scale(picture: Image.Image, low: float, mid: float, high: float) -> Image.Image:
    """The picture with a colour bar under it, labelled with the lowest, median and highest score."""
    width, height = picture.size
    bar = max(10, height // 40)
    canvas = Image.new("RGB", (width, height + bar + 18), "white")
    canvas.paste(picture)
    strip = colours(np.linspace(0, 1, width))[None].repeat(bar, 0)
    canvas.paste(Image.fromarray(strip.round().astype(np.uint8)), (0, height + 2))
    draw = ImageDraw.Draw(canvas)
    y = height + bar + 4
    draw.text((2, y), f"low {low:.3g}", fill="black")
    draw.text((width // 2, y), f"median {mid:.3g}", fill="black", anchor="ma")
    draw.text((width - 2, y), f"high {high:.3g}", fill="black", anchor="ra")
    return canvas


def token_at(g: Geometry, tokens: torch.Tensor, x: float, y: float) -> int | None:
    """The token of `tokens` whose box holds the displayed pixel (x, y), or None."""
    width, height = display_size(g)
    px, py = x * g.image_size[0] / width, y * g.image_size[1] / height
    boxes = g.boxes[tokens]
    inside = (boxes[:, 0] <= px) & (px < boxes[:, 2]) & (boxes[:, 1] <= py) & (py < boxes[:, 3])
    hits = tokens[inside]
    return int(hits[0]) if len(hits) else None


def describe(g: Geometry, selection: Selection, token: int) -> str:
    """One line on a token: where it sits, its score and its fate."""
    row, col = g.cells[token].tolist()
    x0, y0, x1, y1 = g.boxes[token].tolist()
    where = f"token {token}: {g.names[g.partition[token]]}, cell (row {row}, col {col}), "
    where += f"pixels x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}"
    score = selection.scores[token].item() if selection.scores is not None else math.nan
    into = int(selection.groups[token]) if selection.groups is not None else -1
    if bool((selection.keep == token).any()):
        fate = "kept"
    elif into >= 0:
        fate = f"merged into token {into}"
    else:
        fate = "dropped"
    return f"{where}; score {score:.4g}; {fate}" if not math.isnan(score) else f"{where}; {fate}"


def save_chart(figure, html: str | Path, width: int | None = None) -> str | None:
    """Write a Plotly chart as HTML, and as a PNG beside it (`width` pixels across; default: Plotly's)
    when kaleido finds Chrome or Chromium to drive. Returns None, or why there is no PNG (the error's
    first line)."""
    figure.write_html(html, include_plotlyjs=True)
    try:
        figure.write_image(Path(html).with_suffix(".png"), width=width)
    except Exception as error:  # kaleido missing, or no Chrome for it to drive
        return first_line(error)
    return None


def budget_figure(result):
    """A plotly chart of how the run spent its visual tokens, partition by partition: the tokens there
    were, the budget each partition got and the tokens it kept, with any per-partition statistic of
    the method (HiRED's content counts) on a second axis."""
    import plotly.graph_objects as go

    parts = [p for p in result.tokens["by_partition"] if p["full"]]
    names = [p["name"] for p in parts]
    budgets = result.selection.budgets
    figure = go.Figure()
    figure.add_bar(name="tokens in the image", x=names, y=[p["full"] for p in parts], marker_color="#d0d0d0")
    if budgets:
        figure.add_bar(name="budget", x=names, y=[budgets.get(n, 0) for n in names], marker_color="#8fb3de")
    figure.add_bar(name="kept", x=names, y=[p["kept"] for p in parts], marker_color="#f0a800")
    for stat, values in result.selection.stats.items():
        figure.add_scatter(
            name=stat, x=names, y=[values.get(n) for n in names], yaxis="y2", mode="markers+lines", marker_size=10
        )
    figure.update_layout(
        barmode="group",
        title=f"{result.method}: {result.tokens['visual_kept']} of {result.tokens['visual_full']} visual tokens kept"
        + (" (adaptive: the method chose how many)" if result.tokens.get("adaptive") else "")
        + _cut_before(result.tokens.get("llm_cuts")),
        yaxis_title="visual tokens",
        yaxis2=dict(overlaying="y", side="right", title=", ".join(result.selection.stats), showgrid=False),
        legend=dict(orientation="h", y=-0.2),
        margin=dict(l=50, r=50, t=50, b=40),
        height=360,
    )
    return figure


def _cut_before(cuts: list[dict] | None) -> str:
    """Where a method working inside the LLM cut, for a title."""
    return ", cut before LLM layer " + ", ".join(str(c["layer"]) for c in cuts) if cuts else ""


def metrics(reduced, full=None, drift: dict | None = None) -> list[list[str]]:
    """Rows of (what, reduced, full, reduced / full) for the numbers of one or two runs, and how far
    the reduced model drifts on the full answer (`fidelity.drift`)."""
    rows = [
        ("visual tokens", lambda r: r.tokens["visual_kept"], "{:d}"),
        *(
            (f"  {p['name']}", lambda r, i=i: r.tokens["by_partition"][i]["kept"], "{:d}")
            for i, p in enumerate(reduced.tokens["by_partition"])
        ),
        ("visual tokens per LLM layer, mean", lambda r: r.tokens.get("visual_layer_mean"), "{:.0f}"),
        ("text tokens", lambda r: r.tokens["text"], "{:d}"),
        ("generated tokens", lambda r: r.tokens["generated"], "{:d}"),
        ("time to first token (s)", lambda r: r.timing["ttft_s"], "{:.3f}"),
        ("prefill (s)", lambda r: r.timing["prefill_s"], "{:.3f}"),
        ("decode (tokens/s)", lambda r: r.timing["decode_tokens_per_s"], "{:.1f}"),
        ("total (s)", lambda r: r.timing["total_s"], "{:.3f}"),
        ("vision encoder (s)", lambda r: r.timing["vision_s"], "{:.3f}"),
        ("selection (s)", lambda r: r.timing["selection_s"], "{:.4f}"),
        (_memory_row(reduced.memory["device"]), lambda r: _mib(r.memory["peak_bytes"]), "{:.0f}"),
        ("vision encoder and projector (TFLOPs, computed)", lambda r: _tera(r.cost.get("vision_flops")), "{:.3g}"),
        ("LLM prefill (TFLOPs, computed)", lambda r: r.cost["prefill_flops"] / 1e12, "{:.3g}"),
        ("KV cache of the prompt, decoding (MiB, computed)", lambda r: _mib(r.cost["kv_bytes"]), "{:.1f}"),
    ]
    table = []
    for what, get, form in rows:
        a, b = get(reduced), get(full) if full is not None else None
        ratio = f"{a / b:.2f}x" if a is not None and b and what != "selection (s)" else ""
        table.append([what, _format(a, form), _format(b, form), ratio])
    table += projected_rows(reduced, full)
    if drift is not None:
        first = drift["first_divergence"]
        table += [
            ["full answer, log-prob / token", f"{drift['logprob']:.3f}", f"{drift['full_logprob']:.3f}", ""],
            ["  difference", f"{drift['logprob_diff']:+.3f}", "", ""],
            ["  KL(full || reduced) / token", f"{drift['kl']:.4f}", "", ""],
            ["  greedy choices part at token", "never" if first is None else str(first), "", ""],
        ]
    return table


def _memory_row(device: str) -> str:
    """The peak memory row's name: on a CPU the process's high-water mark, which one run barely moves (the
    order of runs can decide which is higher): the computed KV cache below says what the tokens cost."""
    if device == "cpu":
        return "peak memory (cpu, MiB, process high-water mark)"
    return f"peak memory ({device}, MiB)"


def projected_rows(first, second=None) -> list[list[str]]:
    """Rows of (what, first, second, first / second) for the computed cost of two runs on a real checkpoint's
    architecture (`pipeline.projection`): the reduced and the full run, or two methods; with one run, its
    reduced and full counts. None when the run has no such cost (a real checkpoint)."""
    projected = first.cost.get("projected")
    if projected is None:
        return []
    theirs = second.cost.get("projected") if second is not None else None
    mine, other = projected["reduced"], theirs["reduced"] if theirs else projected["full"]
    rows = [
        ("  vision encoder and projector (TFLOPs)", "vision_flops", 1e12, "{:.3g}"),
        ("  LLM prefill (TFLOPs)", "prefill_flops", 1e12, "{:.3g}"),
        ("  KV cache of the prompt, decoding (MiB)", "kv_bytes", 2**20, "{:.1f}"),
        ("  weights (GiB)", "weight_bytes", 2**30, "{:.2f}"),
    ]
    title = f"computed: real {projected['model'].split('/')[-1]}"  # short: the table's columns stay in sight
    table = [[title, "", "", ""]]
    for what, key, scale, form in rows:
        a, b = mine[key], other[key]
        table.append([what, form.format(a / scale), form.format(b / scale), f"{a / b:.2f}x" if b else ""])
    return table


def strip(pieces: list[str], drift: dict) -> str:
    """HTML: the full answer token by token, each shaded by the KL divergence of the reduced model's
    next-token distribution from the full model's there, and the first token where they part marked."""
    kl = drift["per_token"]["kl"]
    top = max(max(kl, default=0.0), 1e-9)
    spans = []
    for i, (piece, value) in enumerate(zip(pieces, kl)):
        shade = f"rgba(230, 80, 30, {0.85 * value / top:.2f})"
        mark = "border-left: 3px solid black;" if i == drift["first_divergence"] else ""
        text = html.escape(piece).replace("\n", "⏎") or "·"
        spans.append(f'<span title="token {i}: KL {value:.4g}" style="background:{shade};{mark}">{text}</span>')
    return (
        "<div style='font-family:monospace;line-height:1.8;overflow-wrap:anywhere'>"
        "<b>Full answer under the reduced model</b> (darker: more disagreement; bar: greedy choices part)<br>"
        + "".join(spans)
        + "</div>"
    )


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _tera(n: int | None) -> float | None:
    return None if n is None else n / 1e12


def _format(value, form: str) -> str:
    return "" if value is None else form.format(value)


LLM_BUDGET = (
    "Its budget is the mean number of visual tokens over the LLM's layers, as the papers compare such methods "
    "(with its budget_after_cuts setting: the tokens left after the last cut)."
)
STAGES = {
    "vision": "It acts before the language model: dropped tokens never reach the LLM, so every LLM layer "
    "and the KV cache hold only the kept ones.",
    "llm": "It acts inside the language model: the first layers see every visual token, then the "
    "dropped ones are cut from the sequence and the KV cache for all later layers. " + LLM_BUDGET,
    "both": "It acts before the language model and inside it: the LLM receives only the tokens its first "
    "step keeps (merged ones carry their group), then more are cut from the sequence and the KV cache at "
    "later layers. " + LLM_BUDGET,
    "first pass": "It acts before the language model, after a first pass through the LLM's first layers on "
    "every visual token: that pass is the method's own work (its selection time), and the real prefill then "
    "runs on the kept tokens only.",
}


SIGNALS = {  # what each kind of signal is, in plain words (see `explorer.Signals`)
    signals.CLS: "the [CLS] token's attention to each patch",
    signals.CLS_ONEHEAD: "the [CLS] token's attention to each patch, with the heads joined into one",
    signals.CLS_LOGITS: "the [CLS] token's attention scores for each patch, before the softmax",
    signals.KEYS: "the attention keys of each patch",
    signals.HIDDEN: "the vision encoder's output for each patch",
}


LLM_SIGNALS = {  # read inside the LLM, where a method cuts
    signals.LLM_ATTENTION: "the attention of the prompt's text to each visual token, at the LLM layer that scores",
    signals.LLM_KEYS: "the attention keys of the visual and text tokens at the LLM layer that scores",
    signals.LLM_HIDDEN: "the LLM's hidden states of the visual and text tokens where it cuts",
    signals.LLM_EMBEDS: "the LLM's input embeddings of the visual and text tokens",
    signals.LLM_TRANSITION: "how much the LLM's attention and MLP layers change each visual token (its "
    "transition variation), summed over the layers before the cut",
    signals.LLM_ROPE: "what rotary position embedding alone adds to each text token's attention logit for each "
    "visual token",
    signals.LLM_POSITIONS: "the positions of the visual and text tokens in the prompt",
    signals.LLM_RESIDUAL: "the LLM's hidden states of the visual and text tokens where it cuts, as they are (not "
    "normalised): what a merge there mixes",
    signals.LLM_LOGITS: "the last prompt token's query-key products with every prompt token at an early LLM layer, "
    "in a first pass",
}


def signal_name(signal: str) -> str:
    kind, _, layer = signal.partition("@")
    where = {
        signals.FEATURE: "the feature layer (whose output the LLM receives)",
        signals.LAST: "the last vision layer",
    }
    if kind in SIGNALS:
        if layer.startswith(f"{signals.FEATURE}-"):
            return f"{SIGNALS[kind]} {layer[8:]} layer(s) below the feature layer"
        return f"{SIGNALS[kind]} at {where.get(layer, f'vision layer {layer}')}"
    return {signals.FEATURES: "the projected features the LLM receives", **LLM_SIGNALS}.get(signal, signal)


NO_CLS = (  # what stands in for [CLS] attention on encoders without a [CLS] token (see `backends.signals`)
    "the [CLS] attention above is, as community ports of these methods do, the attention each patch receives: "
    "averaged over heads and over the patches attending to it (and over the patches a token folds together)"
)


def explain(method: str, cls_token: bool | None = None) -> str:
    """Plain-language markdown on a method: what it does, what it reads, at which stage. `cls_token`:
    whether the model's vision encoder has a [CLS] token; None when the model is not known."""
    cls = METHODS[method]
    doc = inspect.getdoc(inspect.getmodule(cls)) or ""  # each method file opens with its paper and idea
    paragraphs = doc.split("\n\n")
    text = [f"**{cls.summary}**", " ".join(paragraphs[0].split())]
    text += ["\n".join(p for p in paragraphs[1:] if not p.startswith(("Differs", "Without a [CLS]")))]
    needs = (*cls.vision_needs, *cls.needs)  # a two-step method reads both stages' signals
    needs += (signals.LLM_LOGITS,) if cls.early_layer is not None else ()  # what its first pass gives
    if needs:
        text.append("It reads " + "; ".join(signal_name(s) for s in needs) + ".")
    if any(s.startswith(signals.CLS) for s in needs) and cls_token is not True:
        text.append(
            f"This model's vision encoder has no [CLS] token, so {NO_CLS}."
            if cls_token is False
            else f"On vision encoders without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL "
            f"ViT), {NO_CLS}."
        )
    if cls.budgeted:
        stage = "both" if cls.select_vision is not None else "first pass" if cls.early_layer is not None else cls.stage
        text.append(STAGES.get(stage, ""))
    text += [" ".join(p.split()) for p in paragraphs if p.startswith("Differs")]
    return "\n\n".join(t for t in text if t)
