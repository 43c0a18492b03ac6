"""The budget animation, for slides: the kept set shrinking from 100% to 5%, one frame per budget, each
with its count, as an animated GIF. The frames come from the live preview (`explorer.views.preview`), so
the vision pass runs once; Pillow writes the GIF (no video encoder needed).

    path = animation.gif(animation.frames(backend, picture, "hired", animation.budgets(20)), "hired.gif")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core import ExplorerError, Geometry
from . import visual as vis
from .preview import VisionCache, preview

WIDTH = 800  # frame width in pixels (the picture is never enlarged)
TIMES_MS = (900, 300, 1500)  # how long the first frame, each middle one and the last one stay


def budgets(frames: int = 20, high: float = 1.0, low: float = 0.05) -> list[float]:
    """`frames` budgets from `high` down to `low`, evenly spaced on a log scale (more frames at the small
    budgets, where most changes), as fractions rounded to 0.1%."""
    if not 2 <= frames <= 100:
        raise ExplorerError(f"an animation has 2 to 100 frames, got {frames}")
    return [round(float(b), 3) for b in np.geomspace(high, low, frames)]


def frames(
    backend,
    picture: Image.Image,
    method: str,
    fractions: list[float],
    settings: dict | None = None,
    cache: VisionCache | None = None,
    image: str | None = None,
    step=None,
) -> list[Image.Image]:
    """One picture per budget: the main view (the crops, or the whole image) with its kept and dropped
    patches and a bar with the count and the budget. `step(i, total)` is called before each frame."""
    cache = cache if cache is not None else VisionCache()
    out, small = [], None
    for i, fraction in enumerate(fractions):
        if step is not None:
            step(i, len(fractions))
        shown = preview(backend, picture, method, fraction, settings, cache, image, wait_s=60.0)
        if shown.pending:
            raise ExplorerError(f"{shown.note}; an animation needs a method that chooses before the LLM")
        if small is None:  # every budget has the image's geometry: scale the picture and its view once
            small, g = _smaller(picture, shown.geometry)
            view = list(vis.views(g).values())[-1]
        drawn = vis.overlay(small, g, shown.selection, view)
        out.append(_captioned(drawn, f"{method}: {shown.count}"))
    return out


def _smaller(picture: Image.Image, g: Geometry) -> tuple[Image.Image, Geometry]:
    """The picture and its geometry scaled down to WIDTH pixels across (never up)."""
    scale = min(1.0, WIDTH / g.image_size[0])
    size = (max(1, round(g.image_size[0] * scale)), max(1, round(g.image_size[1] * scale)))
    return picture.resize(size), Geometry(g.names, g.partition, g.cells, g.boxes * scale, size)


def _captioned(picture: Image.Image, text: str) -> Image.Image:
    """The picture under a white bar that holds `text`."""
    bar = max(28, picture.height // 22)
    out = Image.new("RGB", (picture.width, picture.height + bar), "white")
    out.paste(picture, (0, bar))
    font = ImageFont.load_default(size=max(12, int(bar * 0.55)))
    ImageDraw.Draw(out).text((8, bar // 2), text, fill="black", font=font, anchor="lm")
    return out


def gif(pictures: list[Image.Image], path: str | Path) -> Path:
    """Write the pictures as a looping GIF: one 255-colour palette for all, no dithering, and every pixel
    that did not change since the previous frame left transparent, so each frame stores only the
    patches that were just dropped (about a tenth of the size of Pillow's default GIF)."""
    if len(pictures) < 2:
        raise ExplorerError("an animation needs at least two frames")
    width, height = pictures[0].size
    sample = Image.new("RGB", (width, 2 * height))
    sample.paste(pictures[0], (0, 0))
    sample.paste(pictures[-1], (0, height))
    palette = sample.quantize(255, method=Image.Quantize.MEDIANCUT)  # index 255 stays free: transparent
    indexed = [np.asarray(p.quantize(palette=palette, dither=Image.Dither.NONE)) for p in pictures]
    deltas = [indexed[0]] + [np.where(now == before, 255, now) for before, now in zip(indexed, indexed[1:])]
    colours = (palette.getpalette() + [0] * 768)[: 255 * 3] + [0, 0, 0]
    out = []
    for delta in deltas:
        frame = Image.fromarray(delta.astype(np.uint8), "P")
        frame.putpalette(colours)
        out.append(frame)
    first, middle, last = TIMES_MS
    durations = [first] + [middle] * (len(out) - 2) + [last]
    path = Path(path)
    out[0].save(
        path, "GIF", save_all=True, append_images=out[1:], duration=durations, loop=0, disposal=1, transparency=255
    )
    return path
