"""Open any image a user may give: check its size before decoding, undo EXIF rotation, make it RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core import ExplorerError

MAX_PIXELS = 10_000 * 10_000  # larger images are refused before they are decoded


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or a PIL image, upright as its EXIF orientation says."""
    if isinstance(image, Image.Image):
        return _rgb(_checked(image, "the image"))
    path = Path(image)
    if not path.is_file():
        raise ExplorerError(f"no image file at {path}")
    if path.stat().st_size == 0:
        raise ExplorerError(f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides
            with Image.open(path) as opened:
                return _rgb(_checked(opened, str(path)))
    except UnidentifiedImageError:
        raise ExplorerError(f"{path} is not an image this app can read") from None
    except Image.DecompressionBombError:
        raise ExplorerError(f"{path} is too large: over {MAX_PIXELS / 1e6:.0f} megapixels") from None  # PIL's own guard
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ExplorerError(f"{path} could not be decoded ({e})") from None


def _checked(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise ExplorerError(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ExplorerError(
            f"{name} is too large: {width}x{height} is {width * height / 1e6:.0f} megapixels, the limit is {MAX_PIXELS / 1e6:.0f}"
        )
    image.load()  # decode now, so corrupt data fails here
    return ImageOps.exif_transpose(image)


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white and high-bit-depth images scaled to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0  # 16-bit data or 8-bit data in a wide mode
        image = Image.fromarray((values.clip(0, top) * (255 / top)).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image.convert("RGB")
