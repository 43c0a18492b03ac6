"""Everything runs on CPU and offline, on random-weight models built with the real processor geometry."""

import contextlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never reach the Hub
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np
import pytest
import torch
from PIL import Image

import backends
from backends.geometry import Geometry


@pytest.fixture(scope="session")
def backend():
    """tiny-llava-next, built into a temporary folder and loaded back through `backends.load`."""
    return backends.load("tiny-llava-next", "cpu")


@pytest.fixture(scope="session")
def checkpoint(backend) -> str:
    """The folder the tiny model was saved to."""
    return backends._random_checkpoint("tiny-llava-next").name


@pytest.fixture(scope="module")
def clip_session():
    """The app's session on tiny-llava-onevision, which takes video (a module's own: its caches start empty)."""
    from ui.session import Session

    return Session("tiny-llava-onevision", "cpu")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> str:
    """A clip of 12 frames of moving shapes, 64x32, encoded with PyAV (`test_video.write`)."""
    from test_video import write

    return str(write(tmp_path_factory.mktemp("clip") / "clip.mp4", "mpeg4", count=12))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy RGB image, so attention differs from token to token."""
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def toy_geometry() -> Geometry:
    """An 80x80 image: a 4x4 thumbnail (20-px cells), then 2x2 crops of 4x4 tokens (10-px cells)
    stitched into an 8x8 grid read row by row, each row closed by a newline. N = 16 + 8 * 9 = 88."""
    names = ("base", "crop 0,0", "crop 0,1", "crop 1,0", "crop 1,1", "newline")
    partition, cells, boxes = [], [], []
    for r in range(4):
        for c in range(4):
            partition.append(0), cells.append((r, c)), boxes.append((20 * c, 20 * r, 20 * c + 20, 20 * r + 20))
    for y in range(8):
        for x in range(8):
            partition.append(1 + 2 * (y // 4) + x // 4), cells.append((y % 4, x % 4))
            boxes.append((10 * x, 10 * y, 10 * x + 10, 10 * y + 10))
        partition.append(5), cells.append((y, 0)), boxes.append((float("nan"),) * 4)
    return Geometry(
        names, torch.tensor(partition), torch.tensor(cells), torch.tensor(boxes, dtype=torch.float), (80, 80)
    )


def assert_tiles(boxes: torch.Tensor, region: tuple[float, float, float, float]) -> None:
    """The boxes are exactly the cells of the grid their edges make, and that grid covers the region
    (x0, y0, x1, y1)."""
    xs = sorted(set(boxes[:, 0].tolist()) | set(boxes[:, 2].tolist()))
    ys = sorted(set(boxes[:, 1].tolist()) | set(boxes[:, 3].tolist()))
    assert (xs[0], ys[0], xs[-1], ys[-1]) == tuple(region)
    cells = set()
    for x0, y0, x1, y1 in boxes.tolist():
        assert xs.index(x1) == xs.index(x0) + 1 and ys.index(y1) == ys.index(y0) + 1
        cells.add((xs.index(x0), ys.index(y0)))
    assert len(cells) == len(boxes) == (len(xs) - 1) * (len(ys) - 1)


def run_seeing_embeds(backend, image, prompt: str, method: str, budget: float):
    """A one-token run, and the input embeddings the LLM received in it (one (L, D) per forward)."""
    from explorer import run

    embeds = []
    hook = backend.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"][0]), with_kwargs=True
    )
    try:
        return run(backend, image, prompt, method, budget, max_new_tokens=1), embeds
    finally:
        hook.remove()


@contextlib.contextmanager
def first_layers(backend, count: int):
    """The model runs its first `count` LLM layers only, for a reference that reads nothing after them: a
    layer's input and attention depend on the layers before it alone, and every later (eager) layer would
    only add time and keep its L x L maps."""
    lm = backend.language_model
    layers = lm.layers
    lm.layers = layers[:count]
    try:
        yield
    finally:
        lm.layers = layers
