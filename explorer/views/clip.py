"""A video clip in the app, as plain data and pictures: its vision pass for the live preview, one frame at a
time for the zoomable picture (`viewer`), the strip of frames, and the charts of where its tokens go.

    seen = clip_pass(backend, clip, needs)             # the clip's geometry, signals and encoder patches
    viewer.value-like frame_value(key, g, selection, p, line)   # frame (or temporal group) p of the clip

A clip's geometry has one partition per frame or temporal group (`Geometry.frames`), each laid over the
frame's own pixels; the picture shows one of them at a time, as an image of its own (`engine.clips.part`).
Merged tokens are tinted with their target's colour over the whole clip, so a patch merged into a token
of another frame has that token's colour in every frame.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from backends.signals import FEATURES

from ..core import Geometry, Selection
from ..engine.clips import frames_of, part
from ..engine.pipeline import model_lock
from ..engine.video import Clip
from . import clip_steps, viewer
from . import visual as vis
from .preview import WAIT_S, Busy, Seen
from .style import palette

PROMPT = "Describe the video."  # the processor wants a prompt; the vision pass does not read it
THUMB = 160  # the frame strip's thumbnails, pixels wide


@dataclass(frozen=True)
class ClipSeen(Seen):
    """One vision pass over a clip, and the patches its vision encoder ran on (for the waterfall)."""

    patches: int = 0

    def cpu(self) -> ClipSeen:
        return ClipSeen(self.geometry, {name: value.cpu() for name, value in self.maps.items()}, self.patches)


def clip_pass(backend, clip: Clip, needs: tuple[str, ...], wait_s: float = WAIT_S) -> ClipSeen:
    """The clip's frames through the model's video processor and, for the signals `needs`, its vision
    encoder, as a run does; only the processor (no model work) when `needs` is empty. Raises `Busy` when a
    run holds the model for longer than `wait_s`."""
    prepared = backend.prepare_video(clip.frames, PROMPT, clip.times_s, clip.duration_s)
    patches = sum(backend.encoder_sequences(prepared))
    if not needs:
        return ClipSeen(prepared.geometry, {}, patches)
    lock = model_lock(backend.model)
    if not lock.acquire(timeout=wait_s):
        raise Busy("the model is busy with a run; the preview follows when it is done")
    try:
        with torch.inference_mode():
            project = FEATURES in needs or not backend.one_patch_each(prepared)
            _, maps = backend.encode(prepared, needs, project=project)
    finally:
        lock.release()
    return ClipSeen(prepared.geometry, maps, patches)


def frame_of(clip: Clip, g: Geometry, p: int) -> Image.Image:
    """The picture of partition p: its frame, or the first frame of its temporal group."""
    return clip.frames[frames_of(g.names[p])[0]]


def frame_scene(clip: Clip, g: Geometry, p: int, key: str) -> dict:
    """The viewer's scene of partition p (a frame or temporal group) alone, its one view named "frame"
    and labelled with the partition's name."""
    scene = viewer.scene(frame_of(clip, g, p), part(g, g.members(p)), key)
    (view,) = scene["views"]
    return scene | {"views": [view | {"name": "frame", "panels": [{**view["panels"][0], "label": g.names[p]}]}]}


def targets(selection: Selection) -> torch.Tensor:
    """(T,) sorted: the merge groups of the whole clip, by the token each went into (a kept token is its
    own group), as the viewer orders them to colour them; empty when the method does not merge."""
    if selection.groups is None:
        return torch.zeros(0, dtype=torch.long)
    groups = selection.groups.cpu()
    return groups[groups >= 0].unique()


def framed(g: Geometry, selection: Selection, p: int) -> tuple[Geometry, Selection, np.ndarray | None]:
    """Partition p's geometry on its own, its tokens' selection there, and the colours of its merge groups
    (U, 3) uint8 in the order the viewer sorts its group ids (None when nothing merged): a group whose target
    is in another frame gets an id past the frame's tokens, and every group the colour of its target's rank
    among the clip's targets, so a group looks the same in every frame."""
    tokens = g.members(p)  # (M,) the frame's tokens in the clip
    keep = selection.keep.cpu()
    local = torch.isin(tokens, keep).nonzero()[:, 0]  # (K_p,) kept, as indices into the frame
    scores = None if selection.scores is None else selection.scores.detach().float().cpu()[tokens]
    if selection.groups is None:
        return part(g, tokens), Selection(keep=local, scores=scores), None
    clip_targets, groups = targets(selection), selection.groups.cpu()[tokens]  # (T,), (M,) clip indices
    position = torch.full((len(g),), -1, dtype=torch.long)
    position[tokens] = torch.arange(len(tokens))
    rank = torch.searchsorted(clip_targets, groups.clamp(min=0))  # (M,) each group's target among the clip's
    ids = torch.where(position[groups.clamp(min=0)] >= 0, position[groups.clamp(min=0)], len(tokens) + rank)
    ids = torch.where(groups >= 0, ids, -1)  # (M,) group ids in the frame: its token, or past the frame's
    colours = palette(len(clip_targets)).round().astype(np.uint8)  # (T, 3) by the target's rank in the clip
    valid = ids >= 0
    order, inverse = ids[valid].unique(return_inverse=True)  # the viewer's order: its group ids, sorted
    ranks = torch.zeros(len(order), dtype=torch.long).scatter_(0, inverse, rank[valid])  # (U,) one id, one target
    shown = colours[ranks.numpy()] if len(order) else None
    return part(g, tokens), Selection(keep=local, scores=scores, groups=ids), shown


def frame_value(key: str, g: Geometry, selection: Selection, p: int, line: str, note: str = "", pending=False):
    """The viewer's value for partition p of the clip: its kept set, scores and merge groups, coloured as
    over the whole clip (`palette`, which the viewer uses in place of the scene's)."""
    local_g, local, colours = framed(g, selection, p)
    value = viewer.value(key, local_g, local, line, note, pending)
    return value | ({"palette": viewer._b64(colours.ravel())} if colours is not None else {})


class FrameCount(NamedTuple):
    """One frame or temporal group of the clip: its name, when, and its tokens, all and kept."""

    name: str
    time_s: float
    full: int
    kept: int


def frame_counts(clip: Clip, g: Geometry, keep: torch.Tensor) -> list[FrameCount]:
    """Each frame's (or temporal group's) visual tokens and how many of them are kept."""
    counted = []
    for p in g.frames:
        tokens = g.members(p)
        first = frames_of(g.names[p])[0]
        kept = int(torch.isin(tokens, keep.cpu()).sum())
        counted.append(FrameCount(g.names[p], clip.times_s[first], len(tokens), kept))
    return counted


def strip(clip: Clip, g: Geometry, selection: Selection, chosen: int = 0, word: str = "segment") -> str:
    """HTML: a thumbnail of every frame (or temporal group) with its dropped patches greyed and its kept
    count, the chosen one outlined; under each, a band in its segment's colour (`clip_steps.bands`, the
    segments called `word`) and the frame's budget and facts (`clip_steps.facts`)."""
    cards = []
    keep = selection.keep.cpu()
    bands = clip_steps.bands(g, selection, word)
    for i, (p, counted) in enumerate(zip(g.frames, frame_counts(clip, g, keep))):
        tokens = g.members(p)
        drawn = thumbnail(frame_of(clip, g, p), g.boxes[tokens[~torch.isin(tokens, keep)]])
        mark = " chosen" if i == chosen else ""
        said = clip_steps.facts(g, selection, p)
        cards.append(
            f'<figure class="clip-frame{mark}" data-frame="{i}"><img src="{viewer._jpeg(drawn, 80)}" '
            f'alt="{counted.name}">{bands[i]}<figcaption>{counted.name} · {counted.time_s:.1f} s<br>'
            f"<b>{counted.kept}</b> of {counted.full} kept"
            f"{f'<br><span class=clip-facts>{html.escape(said)}</span>' if said else ''}</figcaption></figure>"
        )
    return f'<style>{STRIP_CSS}</style><div class="clip-strip">{"".join(cards)}</div>'


def agreement_strip(clip: Clip, g: Geometry, keep_a: torch.Tensor, keep_b: torch.Tensor) -> str:
    """HTML: every frame (or temporal group) with two methods' choices drawn as `visual.agreement` draws them
    on an image (kept by both untouched, by one tinted with its colour, by neither greyed and darkened),
    and its counts under it."""
    cards = []
    for p in g.frames:
        drawn, counts = vis.agreement(frame_of(clip, g, p), g, keep_a, keep_b, g.members(p))
        small = drawn.resize((THUMB, max(1, round(drawn.height * THUMB / drawn.width))), reducing_gap=2.0)
        said = ", ".join(f"{k} {v}" for k, v in counts.items())
        cards.append(
            f'<figure class="clip-frame clip-pair"><img src="{viewer._jpeg(small, 85)}" alt="{g.names[p]}">'
            f"<figcaption>{g.names[p]}<br>{said}</figcaption></figure>"
        )
    return f'<style>{STRIP_CSS}</style><div class="clip-strip">{"".join(cards)}</div>'


def thumbnail(picture: Image.Image, dropped: torch.Tensor) -> Image.Image:
    """The frame THUMB pixels wide with the patches of `dropped` (D, 4) boxes on it greyed, as the picture
    greys them (`visual.dimmed`); a few milliseconds, where the full overlay takes tens."""
    scale = THUMB / picture.width
    small = picture.resize((THUMB, max(1, round(picture.height * scale))), reducing_gap=2.0)
    pixels = np.asarray(small, dtype=np.float32)  # (H, W, 3)
    grey = np.zeros(pixels.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in (dropped * scale).round().long().tolist():
        grey[y0:y1, x0:x1] = True
    pixels[grey] = vis.dimmed(pixels[grey])
    return Image.fromarray(pixels.round().astype(np.uint8))


STRIP_CSS = """
.clip-strip { display: flex; flex-wrap: wrap; gap: 8px; }
.clip-frame { margin: 0; flex: 0 0 auto; width: 104px; font-size: 12px; line-height: 1.3; }
.clip-frame img { width: 100%; height: auto; display: block; border-radius: 4px; border: 3px solid transparent; }
.clip-frame.chosen img { border-color: #f0a800; }
.clip-frame.clip-pair { width: 160px; }
.clip-band { margin-top: 3px; min-height: 6px; border-radius: 3px; padding: 0 3px; font-size: 11px; color: #111; }
.clip-facts { color: #666; }
"""


def per_frame_figure(counts: list[FrameCount], title: str):
    """A plotly chart of each frame's visual tokens and how many were kept."""
    import plotly.graph_objects as go

    names = [f"{c.name} ({c.time_s:.1f} s)" for c in counts]
    figure = go.Figure()
    figure.add_bar(name="visual tokens", x=names, y=[c.full for c in counts], marker_color="#d0d0d0")
    figure.add_bar(name="kept", x=names, y=[c.kept for c in counts], marker_color="#f0a800")
    figure.update_layout(
        barmode="overlay", title=title, yaxis_title="visual tokens", legend=dict(orientation="h", y=-0.25), height=320
    )
    return figure


class Flow(NamedTuple):
    """How a clip becomes what the LLM reads: frames, the patches the vision encoder ran on, the visual tokens
    the model makes of them, those that reach the LLM, and (for a method that cuts inside the LLM) the visual
    tokens each LLM layer sees; `per_layer` empty when every layer sees what reached it."""

    frames: int
    patches: int
    visual: int
    entering: int
    per_layer: tuple[int, ...] = ()


def flow_of(frames: int, patches: int, tokens: dict) -> Flow:
    """The flow of a run, from its `Result.tokens`."""
    cut = bool(tokens["llm_cuts"])
    entering = tokens.get("visual_entering", tokens["visual_kept"])
    return Flow(frames, patches, tokens["visual_full"], entering, tuple(tokens["visual_per_layer"]) if cut else ())


def waterfall_figure(flow: Flow, title: str):
    """A plotly chart of the counts on the way in, on a log scale: frames -> encoder patches -> visual
    tokens -> tokens that reach the LLM -> each LLM layer's (for a method that cuts inside the LLM)."""
    import plotly.graph_objects as go

    names = ["frames", "encoder patches", "visual tokens", "reach the LLM"]
    values = [flow.frames, flow.patches, flow.visual, flow.entering]
    names += [f"LLM layer {i}" for i in range(len(flow.per_layer))]
    values += list(flow.per_layer)
    colours = ["#8fb3de", "#b0b0b0", "#d0d0d0", "#f0a800"] + ["#e07b39"] * len(flow.per_layer)
    figure = go.Figure(go.Bar(x=names, y=values, marker_color=colours, text=values, textposition="auto"))
    figure.update_layout(title=title, yaxis=dict(type="log", title="count (log scale)"), height=340, showlegend=False)
    return figure
