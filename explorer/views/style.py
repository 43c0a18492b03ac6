"""The look of the kept-vs-dropped picture, in one place: the PIL pictures (`visual`) are drawn with it,
and the browser's canvas (`assets/viewer`) gets it with each image (`viewer.scene(...)["style"]`), its
legend included."""

from __future__ import annotations

import colorsys

import numpy as np

KEPT = (255, 212, 0)  # the outline around kept patches
DIM = 0.35  # a dropped patch turns grey, at this share of its brightness
HATCH = (190, 190, 190)  # the diagonal lines across dropped patches, which show even on a black image
HATCH_EVERY = 80  # one hatch line every (longer side / this) pixels, at least 6 apart
TINT = 0.5  # a merged patch's share of its group's colour (`palette`)
LUMA = (0.299, 0.587, 0.114)  # brightness of an RGB colour (ITU-R BT.601)
INFERNO = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))  # scores, dark to bright
# (the anchors of matplotlib's perceptually ordered "inferno", CC0)
HEAT_UNDER = 0.35  # the image's share of a heatmap pixel
UNDERLAY = (64, 0.5)  # the grey image under a heatmap: brightness l (0..255) -> 64 + 0.5 l, in the middle
ONLY_A, ONLY_B = (40, 110, 255), (255, 140, 0)  # tints for tokens that only one of two methods kept
LABEL, FRAME = (242, 242, 242), (154, 160, 166)  # the canvas's panel labels and the lines around panels
PHOTO = (201, 162, 122)  # a photo's colour, under the legend's swatches
STAGE = {  # the stages of a run's time (`stages`), in the order they run
    "preprocessing": (148, 148, 148),
    "vision encoder": (31, 119, 180),
    "selection": (214, 39, 40),
    "LLM prefill": (44, 160, 44),
    "decode": (255, 127, 14),
}


def hatch_step(shape: tuple[int, int]) -> int:
    """Pixels from one hatch line to the next on a picture of `shape` (H, W)."""
    return max(6, round(max(shape) / HATCH_EVERY))


def hatch_width(every: int) -> int:
    """How wide a hatch line is, `every` pixels apart: a third of that, at least 2."""
    return max(2, every // 3)


def palette(n: int) -> np.ndarray:
    """(n, 3) float distinct bright colours, the golden-ratio walk around the hue circle: the colours of
    merge groups, in the order of the tokens they went into."""
    hues = (np.arange(n) * 0.618034) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues], dtype=np.float32).reshape(n, 3) * 255


def legend() -> list[dict]:
    """The picture's key: what each look means (`words`) and a swatch of it (`swatch`, CSS), drawn on
    `PHOTO` as the picture draws it."""
    grey = [round(DIM * float(np.dot(PHOTO, LUMA)))] * 3
    tints = [(1 - TINT) * np.array(grey) + TINT * colour for colour in palette(2)]
    return [
        {
            "words": "kept (untouched, outlined)",
            "swatch": f"background: {css(PHOTO)}; box-shadow: 0 0 0 2px {css(KEPT)}",
        },
        {
            "words": "dropped (greyed, hatched)",
            "swatch": f"background: repeating-linear-gradient(-45deg, {css(HATCH)} 0 2px, {css(grey)} 2px 6px)",
        },
        {
            "words": "merged (tinted like the kept token it went into)",
            "swatch": f"background: linear-gradient(90deg, {css(tints[0])}, {css(tints[1])})",
        },
        {
            "words": "newline tokens: no patch, counted but not drawn",
            "swatch": f"background: {css((255, 255, 255))}; border: 1px dashed {css((136, 136, 136))}",
        },
    ]


def scale() -> str:
    """CSS: the colour scale of the scores, low to high."""
    return f"linear-gradient(90deg, {', '.join(css(c) for c in INFERNO)})"


def css(colour) -> str:
    return "rgb({}, {}, {})".format(*(round(float(c)) for c in colour))
