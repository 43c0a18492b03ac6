"""Geometry of LLaVA-NeXT's visual tokens on the user's image, for square, wide, tall and tiny images."""

import numpy as np
import pytest
import torch
from conftest import assert_tiles, photo
from PIL import Image

SIZES = [
    (640, 480),
    (672, 672),
    (336, 336),
    (1008, 336),
    (336, 1008),
    (800, 400),
    (100, 800),
    (1920, 1080),
    (1, 1),
    (3, 2),
    (1, 10000),
    (10000, 1),
]


@pytest.mark.parametrize("size", SIZES)
def test_geometry_tiles_the_image_and_matches_the_processor(backend, size):
    width, height = size
    prepared = backend.prepare(photo(width, height), "What is this?")
    g = prepared.geometry
    assert len(g) == int((prepared.inputs["input_ids"] == backend.model.config.image_token_id).sum())
    assert g.image_size == (width, height)
    newline = g.partition == g.names.index("newline")
    base = g.partition == g.names.index("base")
    boxes = g.boxes[~newline]
    assert boxes.isfinite().all() and g.boxes[newline].isnan().all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 0] < boxes[:, 2]).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all() and (boxes[:, 1] < boxes[:, 3]).all()
    assert int(base.sum()) == 576
    assert_tiles(g.boxes[base], (0, 0, width, height))
    if (~base & ~newline).any():
        assert_tiles(g.boxes[~base & ~newline], (0, 0, width, height))
    for p in range(len(g.names)):  # every partition is a full rectangle listed in raster order
        members = g.members(p)
        rows, cols = g.grid(p)
        cells = g.cells[members] - g.cells[members].amin(0) if len(members) else g.cells[:0]
        assert len(members) == rows * cols
        assert torch.equal(cells[:, 0] * cols + cells[:, 1], torch.arange(len(members)))


@pytest.mark.parametrize(
    "size, tokens",
    [
        ((672, 672), 2928),
        ((640, 480), 2340),
        ((1008, 336), 2328),
        ((336, 336), 1176),
        ((1920, 1080), 1948),
        ((100, 800), 1368),
    ],
)
def test_token_counts_are_those_of_llava_hf_checkpoints(backend, size, tokens):
    # measured with the llava-v1.6 processor settings (../shared/research/ecosystem.md, section 4)
    assert len(backend.prepare(photo(*size), "hi").geometry) == tokens


@pytest.mark.parametrize("size", [(640, 480), (800, 400), (336, 1008), (1920, 1080)])
def test_every_box_covers_the_pixels_its_token_saw(backend, size):
    """On an image whose colour encodes the position (red = x, green = y), the mean colour of each
    token's patch in pixel_values must point back inside its box."""
    width, height = size
    x, y = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)
    pixels = np.stack([x * 255, y * 255, np.zeros_like(x)], -1).round().astype(np.uint8)
    prepared = backend.prepare(Image.fromarray(pixels), "hi")
    g, src = prepared.geometry, prepared.source
    processor = backend.processor.image_processor
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    crops = prepared.inputs["pixel_values"][0] * std + mean  # (crops, 3, 336, 336) in [0, 1]
    patch = backend.model.config.vision_config.patch_size
    side = crops.shape[-1] // patch
    inner = (g.boxes[:, 0] > 0) & (g.boxes[:, 1] > 0) & (g.boxes[:, 2] < width) & (g.boxes[:, 3] < height)
    checked = 0
    for t in inner.nonzero()[:, 0].tolist():
        crop, i, j = int(src[t]) // side**2, int(src[t]) % side**2 // side, int(src[t]) % side
        r, gr = crops[crop, :2, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].mean((1, 2)).tolist()
        x0, y0, x1, y1 = g.boxes[t].tolist()
        slack_x, slack_y = (x1 - x0) * 0.1 + 1, (y1 - y0) * 0.1 + 1  # resampling blurs a little
        assert x0 - slack_x <= r * width <= x1 + slack_x, (t, g.names[g.partition[t]], r * width, (x0, x1))
        assert y0 - slack_y <= gr * height <= y1 + slack_y, (t, g.names[g.partition[t]], gr * height, (y0, y1))
        checked += 1
    assert checked > 0.8 * len(g)
