"""What a method did on the visitor's clip, drawn and said: the runs of frames a video method treats together
(FastVID's DySeg segments, HoliTom's windows, DyCoke's windows of 4) as bands under the frame strip, each
frame's facts beside its kept count (its budget, VidCom2's uniqueness, EVS's mean change), its merge groups
across frames, one sentence per method, and DyCoke's decode-time cut: at each decode step, how many visual
tokens the layers from its cut on attended to, against how many the KV cache holds.

    runs = segments(g, selection)                      # from `Selection.stats["segment"]`
    html(method, g, selection, result_tokens_or_None)  # "what this method did on your clip"
    decode_figure(result.tokens)                       # DyCoke's chart; None for other methods

Everything here reads what the method returned (`Selection`) and what the run counted (`Result.tokens`).
"""

from __future__ import annotations

import html as escape
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..core import Geometry, Selection
from ..engine.clips import frames_of
from ..methods import METHODS
from .style import css, palette

SEGMENT = "segment"  # the `Selection.stats` key of a clip's runs of frames (explorer.core)
WORDS = {"holitom": "window", "dycoke": "window"}  # what a method calls its runs of frames; "segment" otherwise


class Segment(NamedTuple):
    """A run of consecutive frames a method treats together."""

    index: int  # the method's number for it
    first: int  # its first and last positions among the clip's partitions (`Geometry.frames`)
    last: int
    frames: tuple[int, int]  # its first and last frame of the clip

    def label(self, word: str = "segment") -> str:
        a, b = self.frames
        return f"{word} {self.index}: frame {a}" if a == b else f"{word} {self.index}: frames {a}-{b}"


def segments(g: Geometry, selection: Selection) -> list[Segment]:
    """The method's runs of frames, in order, from its `stats["segment"]`; [] when it has none."""
    marks, runs = selection.stats.get(SEGMENT, {}), []
    for i, p in enumerate(g.frames):
        if g.names[p] not in marks:
            continue
        index, shown = int(marks[g.names[p]]), frames_of(g.names[p])
        if runs and runs[-1].index == index and runs[-1].last == i - 1:
            runs[-1] = runs[-1]._replace(last=i, frames=(runs[-1].frames[0], shown[-1]))
        else:
            runs.append(Segment(index, i, i, (shown[0], shown[-1])))
    return runs


def bands(g: Geometry, selection: Selection, word: str = "segment") -> list[str]:
    """HTML, one per frame of the strip: a band in its segment's colour, labelled on the segment's first
    frame ("segment 2: frames 5-9"); empty strings when the method has no segments."""
    drawn = [""] * len(g.frames)
    colours = palette(max(1, len(runs := segments(g, selection))))
    for run, colour in zip(runs, colours):
        label = escape.escape(run.label(word))
        for i in range(run.first, run.last + 1):
            words = label if i == run.first else ""
            drawn[i] = f'<div class="clip-band" style="background: {css(colour)}" title="{label}">{words}</div>'
    return drawn


def facts(g: Geometry, selection: Selection, p: int) -> str:
    """Partition p's facts beside its kept count: its budget, and the method's per-frame stats (a stat keyed
    by frame names: VidCom2's uniqueness, EVS's mean change), "" when there are none."""
    name = g.names[p]
    said = [f"budget {selection.budgets[name]}"] if name in selection.budgets else []
    said += [
        f"{stat} {values[name]:.3g}" for stat, values in selection.stats.items() if stat != SEGMENT and name in values
    ]
    return " · ".join(said)


def merge_words(g: Geometry, selection: Selection) -> str:
    """The merge groups in words: how many tokens went into how many kept ones, and how many frames the
    groups span (they are tinted alike in every frame); "" when the method does not merge."""
    if selection.groups is None:
        return ""
    groups = selection.groups.cpu()  # (N,)
    position = torch.full((len(g.names),), -1)
    position[torch.tensor(g.frames, dtype=torch.long)] = torch.arange(len(g.frames))
    merged = (groups >= 0) & (groups != torch.arange(len(groups)))  # (N,) went into another token
    if not merged.any():
        return "No token was merged into another: each kept token is its own group."
    targets = groups[merged].unique()  # (T,) the kept tokens that took others in
    frame = position[g.partition]  # (N,) each token's frame, -1 outside frames
    members = torch.isin(groups, targets) & (frame >= 0)  # (N,) the groups' tokens in frames, the kept ones too
    pairs = torch.stack([groups[members], frame[members]], 1).unique(dim=0)  # (P, 2) (group, frame)
    group = torch.searchsorted(targets, pairs[:, 0].contiguous())  # (P,) each pair's group, as an index into T
    spans = torch.bincount(group, minlength=len(targets))  # (T,) the frames each group spans
    several = int((spans > 1).sum())
    return (
        f"Merge groups: {plural(int(merged.sum()), 'token')} merged into {plural(len(targets), 'kept token')}. A "
        "group is a kept token and the tokens merged into it, tinted in its colour in every frame, so a colour that "
        f"comes back in another frame is the same group. Spanning more than one frame: {several} of {len(targets)}"
        + (f" (the widest, {int(spans.max())} frames)." if several else ".")
    )


def kept_of(g: Geometry, selection: Selection) -> list[tuple[str, int, int]]:
    """(name, kept, tokens) of each frame or temporal group of the clip."""
    keep = selection.keep.cpu()
    return [(g.names[p], int(torch.isin(g.members(p), keep).sum()), len(g.members(p))) for p in g.frames]


def _frames(g: Geometry, selection: Selection) -> str:
    counted = kept_of(g, selection)
    whole = [name for name, kept, n in counted if kept == n]
    part = [f"{kept} tokens of {name}" for name, kept, n in counted if 0 < kept < n]
    dropped = [name for name, kept, _ in counted if kept == 0]
    return (
        f"It kept {plural(len(whole), 'whole frame')} ({', '.join(whole) or 'none'})"
        f"{''.join(', and ' + p for p in part)}, and dropped {plural(len(dropped), 'frame')} outright: fewer frames "
        "at the same token budget, each as sharp as unreduced."
    )


def _spread(g: Geometry, selection: Selection) -> str:
    counts = [kept for _, kept, _ in kept_of(g, selection)]
    return f"Every frame kept part of its tokens, {min(counts)} to {max(counts)} a frame, whatever it shows."


def _vidcom2(g: Geometry, selection: Selection) -> str:
    unique = selection.stats["uniqueness"]
    most, least = max(unique, key=unique.get), min(unique, key=unique.get)
    return (
        f"The frame least like the clip's average, {most} (uniqueness {unique[most]:.3g}), got a budget of "
        f"{selection.budgets[most]} tokens; the most ordinary, {least} ({unique[least]:.3g}), "
        f"{selection.budgets[least]}. Within each frame the tokens least like the clip and the frame stayed."
    )


def _runs(word: str, then: str) -> Callable[[Geometry, Selection], str]:
    def said(g: Geometry, selection: Selection) -> str:
        runs = segments(g, selection)
        return f"It cut the clip into {plural(len(runs), word)} ({'; '.join(r.label(word) for r in runs)}); {then}"

    return said


def _dycoke(g: Geometry, selection: Selection) -> str:
    reference = selection.maps["reference frame"]
    compared = {g.names[p]: int(reference[g.members(p)][0]) for p in g.frames if not reference[g.members(p)].isnan()[0]}
    pairs = ", ".join(f"{name} against {g.names[g.frames[r]]}" for name, r in compared.items())
    counted = kept_of(g, selection)
    seen = [(k, n) for name, k, n in counted if name in compared]
    whole = [(k, n) for name, k, n in counted if name not in compared]
    rest = (
        "stayed whole"
        if all(k == n for k, n in whole)
        else f"could not all stay whole at this budget: they kept {sum(k for k, _ in whole)} of their "
        f"{sum(n for _, n in whole)} tokens, spread evenly over each frame"
    )
    return (
        f"TTM compared {plural(len(seen), 'frame')} with a reference frame ({pairs}) and kept only their tokens "
        f"least like the token at the same place there, {sum(k for k, _ in seen)} of their {sum(n for _, n in seen)}; "
        f"the other {plural(len(whole), 'frame')} {rest}."
    )


def _evs(g: Geometry, selection: Selection) -> str:
    change = selection.stats["mean change"]
    if not change:
        return "A clip of one frame: it stayed whole."
    most, least = max(change, key=change.get), min(change, key=change.get)
    kept = {name: k for name, k, _ in kept_of(g, selection)}
    return (
        f"The first frame stayed whole; the frame that changed most from the one before, {most} (mean change "
        f"{change[most]:.3g}), kept {kept[most]} tokens, the one that changed least, {least} "
        f"({change[least]:.3g}), {kept[least]}: the budget went to what moves."
    )


SAID = {  # method -> what it did on this clip, from its selection
    "frames": _frames,
    "uniform": _spread,
    "random": _spread,
    "vidcom2": _vidcom2,
    "fastvid": _runs(
        "segment",
        "each frame kept its most attended tokens, and the other tokens of each segment were merged into density "
        "anchors held by every few frames of it.",
    ),
    "holitom": _runs(
        "window",
        "the tokens alike at their place over a whole window became one token each over time, and each frame's "
        "other tokens kept their most attended ones and joined their nearest cluster centres; then, inside the LLM "
        "at its merge layer, the least attended of those were merged into their most similar kept ones (unless "
        "its merge ratio is 0).",
    ),
    "dycoke": _dycoke,
    "evs": _evs,
}


def decode_words(tokens: dict) -> str:
    """DyCoke's decode-time cut in words, from a run's `Result.tokens`; "" for a run without it."""
    steps = tokens.get("visual_attended_per_step")
    if not steps:
        return ""
    layer, held = tokens["llm_cuts"][-1]["layer"], holding(tokens)
    cut = [s for s in steps if s < held]
    fewest, most = min(cut, default=held), max(cut, default=held)
    return (
        f"While decoding, at {len(cut)} of {len(steps)} steps the LLM's layers from layer {layer} on attended to "
        f"only {fewest if fewest == most else f'{fewest} to {most}'} of the {held} visual tokens the KV cache holds "
        "(those the new token's attention ranks highest); at the other steps, whose attention was alike the step "
        "before's, to all of them. The cache keeps every token, so one left out may come back at the next step."
    )


def holding(tokens: dict) -> int:
    """The visual tokens the KV cache of the last cut's layer holds while decoding."""
    return tokens["visual_cached_per_layer"][tokens["llm_cuts"][-1]["layer"]]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def html(method: str, g: Geometry, selection: Selection, tokens: dict | None = None) -> str:
    """HTML: what `method` did on the clip, its merge groups and (from a run's `tokens`) its decode-time cut."""
    words = [
        f"{len(selection.keep)} of {len(g)} visual tokens kept over {len(g.frames)} frames.",
        SAID[method](g, selection) if method in SAID else _otherwise(method),
        merge_words(g, selection),
        decode_words(tokens) if tokens else "",
    ]
    shown = "".join(f"<p>{escape.escape(w)}</p>" for w in words if w)
    return f"<b>What {escape.escape(method)} did on your clip</b>{shown}"


def _otherwise(method: str) -> str:
    """What a method without its own sentence did, from where it works."""
    cls = METHODS[method]
    if not cls.budgeted:
        return "No reduction: every visual token reaches the LLM."
    if cls.stage == "llm":
        return "It chooses inside the LLM, over the whole clip's tokens at once."
    return "It ran on each frame on its own, with the frame's share of the budget." if cls.on_clips != "clip" else ""


def decode_figure(tokens: dict):
    """A plotly chart of DyCoke's decode-time cut: at each decode step, the visual tokens the KV cache holds
    and those the layers from the cut on attended to; None for a run without it."""
    import plotly.graph_objects as go

    steps = tokens.get("visual_attended_per_step")
    if not steps:
        return None
    layer, held, x = tokens["llm_cuts"][-1]["layer"], holding(tokens), list(range(1, len(steps) + 1))
    figure = go.Figure()
    figure.add_bar(name="in the KV cache", x=x, y=[held] * len(steps), marker_color="#d0d0d0")
    figure.add_bar(name=f"attended from layer {layer} on", x=x, y=steps, marker_color="#e07b39")
    figure.update_layout(
        barmode="overlay",
        title="Visual tokens at each decode step: the cache, and what the cut attends to",
        xaxis_title="decode step (after the first token)",
        yaxis_title="visual tokens",
        legend=dict(orientation="h", y=-0.3),
        height=320,
    )
    return figure
