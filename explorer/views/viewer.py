"""What the app's zoomable picture draws, as plain data: the browser draws it on a canvas
(`assets/viewer.js`), so a budget step sends a few hundred bytes instead of a new image.

- `scene(picture, geometry)`, once per image: the photo, every visual token's box, partition and cell,
  each view (the thumbnail, the crops) laid out as the model tiles it: one panel per partition,
  apart from its neighbours, with a band above each row of panels for their labels; and the picture's
  look (`style`), the same as the PIL pictures'.
- `value(...)`, on every change of budget, method or settings: the kept set as a bitmask, the merge
  groups and the scores, and the line of text above the picture.

Arrays travel as base64 strings of little-endian typed arrays: the page compares its properties on
every update, and long JSON lists make that slow (hundreds of ms for a few thousand numbers).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch
from PIL import Image

from ..core import Geometry, Selection
from . import style as look
from . import visual as vis


def scene(picture: Image.Image, g: Geometry, key: str) -> dict:
    """The image and where its visual tokens sit, for the viewer; `key` names this image and model (a
    `value` is drawn only on the scene of the same key)."""
    width, height = vis.display_size(g)
    scale = torch.tensor([width, height, width, height]) / torch.tensor(g.image_size * 2)
    boxes = (g.boxes * scale).nan_to_num(-1).round()  # (N, 4) on the displayed photo; -1 for newlines
    band = max(18, round(max(width, height) / 28))  # the label band above each row of panels
    pixels = g.boxes.nan_to_num(-1).round()  # (N, 4) on the user's image, rounded as `describe` words them
    return {
        "key": key,
        "photo": _jpeg(picture.convert("RGB").resize((width, height))),
        "width": width,
        "height": height,
        "n": len(g),
        "names": list(g.names),
        "partition": _b64(g.partition.numpy().astype("<u2")),
        "cells": _b64(g.cells.numpy().astype("<u2").ravel()),  # (row, col) per token
        "boxes": _b64(boxes.numpy().astype("<i2").ravel()),  # (x0, y0, x1, y1) per token
        "pixels": _b64(pixels.numpy().astype("<i4").ravel()),  # the same on the user's image
        "views": [_view(name, tokens, g, boxes, band) for name, tokens in reversed(vis.views(g).items())],
        "style": _style(len(g), (height, width)),
    }


def _style(n: int, shape: tuple[int, int]) -> dict:
    """The picture's look (`style`) for n tokens on a photo of `shape` (H, W), with the legend and the
    colour of every possible merge group (`palette`)."""
    every = look.hatch_step(shape)
    return {
        "kept": look.KEPT,
        "dim": look.DIM,
        "luma": look.LUMA,
        "hatch": {"colour": look.HATCH, "every": every, "width": look.hatch_width(every)},
        "tint": look.TINT,
        "palette": _b64(look.palette(n).round().astype(np.uint8).ravel()),  # (n, 3) RGB
        "inferno": look.INFERNO,
        "heat_under": look.HEAT_UNDER,
        "underlay": look.UNDERLAY,
        "label": look.LABEL,
        "frame": look.FRAME,
        "legend": look.legend(),
        "scale": look.scale(),
    }


def _view(name: str, tokens: torch.Tensor, g: Geometry, boxes: torch.Tensor, band: int) -> dict:
    """One view: its tokens and its panels, each partition's part of the photo (`src`) placed at `dst`,
    spaced a third of a band apart, with a band above every row of panels."""
    parts = g.partition[tokens].unique().tolist()
    spans = {p: _span(boxes[tokens[g.partition[tokens] == p]]) for p in parts}  # p -> (x0, y0, x1, y1)
    columns = sorted({x0 for x0, _, _, _ in spans.values()})
    rows = sorted({y0 for _, y0, _, _ in spans.values()})
    gap = band // 3
    panels = []
    for p, (x0, y0, x1, y1) in spans.items():
        column, row = columns.index(x0), rows.index(y0)
        dst = [x0 + column * gap, y0 + (row + 1) * band + row * gap]
        label = name if len(parts) == 1 else g.names[p]
        panels.append({"partition": p, "label": label, "src": [x0, y0, x1, y1], "dst": dst})
    right = max(panel["dst"][0] + panel["src"][2] - panel["src"][0] for panel in panels)
    bottom = max(panel["dst"][1] + panel["src"][3] - panel["src"][1] for panel in panels)
    return {
        "name": name,
        "width": right,
        "height": bottom,
        "band": band,
        "panels": panels,
        "tokens": _b64(tokens.numpy().astype("<i4")),
    }


def _span(boxes: torch.Tensor) -> tuple[int, int, int, int]:
    x0, y0 = boxes[:, :2].amin(0).tolist()
    x1, y1 = boxes[:, 2:].amax(0).tolist()
    return int(x0), int(y0), int(x1), int(y1)


def value(key: str, g: Geometry, selection: Selection, line: str, note: str = "", pending: bool = False) -> dict:
    """One state of the picture: the kept set (a bitmask over the N tokens), the merge groups and the
    scores, the `line` over the picture and the `note` under it; `pending`: the tokens are chosen later
    (inside the LLM), so the picture shows every one."""
    bits = np.zeros(len(g), dtype=bool)
    bits[selection.keep.cpu().numpy()] = True
    groups, scores = selection.groups, selection.scores
    return {
        "key": key,
        "n": len(g),
        "keep": _b64(np.packbits(bits, bitorder="little")),
        "groups": None if groups is None else _b64(groups.cpu().numpy().astype("<i4")),
        "scores": None if scores is None else _b64(scores.detach().float().cpu().numpy().astype("<f4")),
        "text": line,
        "note": note,
        "pending": pending,
    }


def kept_of(payload: dict) -> np.ndarray:
    """(K,) the kept token indices of a `value` (for API callers and tests)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(payload["keep"]), dtype=np.uint8), bitorder="little")
    return np.nonzero(bits[: payload["n"]])[0]


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _jpeg(picture: Image.Image, quality: int = 90) -> str:
    """The picture as a JPEG data URI: 4 ms to encode where a PNG takes 150-700 ms, at a tenth of the size."""
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


CARDS_CSS = """
.steps { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 300px), 1fr)); gap: 14px; }
.steps figure { margin: 0; }
.steps img { width: 100%; height: auto; border-radius: 6px; display: block; }
.steps figcaption { margin-top: 6px; line-height: 1.45; overflow-wrap: anywhere; }
"""


def cards(steps: list[tuple[Image.Image, str]]) -> str:
    """HTML: each step's picture with its whole caption under it, in a grid of as many columns as fit
    (one on a phone). A gallery would cut every caption to one line, and the caption is the lesson."""
    figures = "".join(
        f'<figure><img src="{_jpeg(picture.convert("RGB"))}" alt="step {i}" loading="lazy">'
        f"<figcaption><b>{i}.</b> {html.escape(caption)}</figcaption></figure>"
        for i, (picture, caption) in enumerate(steps, 1)
    )
    return f'<div class="steps">{figures}</div>'
