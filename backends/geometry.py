"""Where each visual token sits: its partition, its grid cell and its pixel box on the user's image,
in the order the LLM reads the tokens; the AnyRes layout of LLaVA-NeXT and LLaVA-OneVision, and the layout
of a clip whose frames are pooled to a smaller grid (LLaVA-OneVision's video)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import transformers  # lazy: its model code loads on first use, not when this file is imported

from .errors import ExplorerError


@dataclass(frozen=True)
class Geometry:
    """Where each of the N visual tokens of one image sits, in the order the LLM reads them.

    Every partition except "newline" is a full rectangle of cells listed in raster order, so its
    tokens, sorted by LLM index, walk its grid row by row.
    """

    # partition names: "base", "crop R,C", ..., "newline"; "image"; "tile R,C", "global"; "frame F", ..., "newline"
    names: tuple[str, ...]
    partition: torch.Tensor  # (N,) long, index into `names`
    cells: torch.Tensor  # (N, 2) long, (row, col) in the partition's grid; newline i is (i, 0)
    boxes: torch.Tensor  # (N, 4) float, (x0, y0, x1, y1) on the original image (a clip: its frame); NaN for newlines
    image_size: tuple[int, int]  # (width, height) of the original image (a clip: of each of its frames)

    def __len__(self) -> int:
        return len(self.partition)

    def members(self, p: int) -> torch.Tensor:
        """(M,) sorted indices of partition p's tokens."""
        return (self.partition == p).nonzero()[:, 0]

    def sizes(self) -> list[int]:
        return torch.bincount(self.partition, minlength=len(self.names)).tolist()

    def grid(self, p: int) -> tuple[int, int]:
        """(rows, cols) of partition p's rectangle, (0, 0) when it is empty."""
        cells = self.cells[self.partition == p]
        if len(cells) == 0:
            return 0, 0
        rows, cols = (cells.amax(0) - cells.amin(0) + 1).tolist()
        return rows, cols

    @property
    def thumbnail(self) -> int | None:
        """The partition that shows the whole image at low resolution beside high-resolution crops:
        "base" (LLaVA-NeXT, OneVision) or "global" (SmolVLM); None for models that see the image once."""
        return next((p for p, name in enumerate(self.names) if name in ("base", "global")), None)

    @property
    def crops(self) -> list[int]:
        """The partitions that each show a part of the image at high resolution: "crop R,C" or "tile R,C"."""
        return [p for p, name in enumerate(self.names) if name.startswith(("crop ", "tile "))]

    @property
    def frames(self) -> list[int]:
        """A clip's partitions: each a frame, "frame 3", or a temporal group of frames, "frames 2-3"; none for an image."""
        return [p for p, name in enumerate(self.names) if name.startswith(("frame ", "frames "))]

    def frame_grid(self) -> torch.Tensor:
        """(F, M) long: each frame's (or temporal group's) tokens of a clip, in LLM order; every frame has M."""
        return torch.stack([self.members(p) for p in self.frames])

    def outside_frames(self) -> torch.Tensor:
        """(K,) long: a clip's tokens of no frame, in LLM order (LLaVA-OneVision's newline after the last frame)."""
        return (~torch.isin(self.partition, torch.tensor(self.frames, dtype=torch.long))).nonzero()[:, 0]


Times = list[float] | None  # each frame's time in seconds from the video's start; None where not known


@dataclass(frozen=True)
class Prepared:
    """One image (or clip) and prompt, ready for the model."""

    inputs: dict  # the processor's tensors, on the model's device
    geometry: Geometry
    # (N,) long: each visual token's row in the flat (crops * patches) encoder output, -1 for a token that has
    # no single row (newlines; tokens folded or resampled from several patches)
    source: torch.Tensor
    text_tokens: int  # prompt tokens that are not visual tokens
    video: bool = False  # the visual tokens are a clip's (the model's video token and video inputs), not an image's


def clip_metadata(frames: list, times_s: Times, duration_s: float):
    """transformers' `VideoMetadata` of a clip of these frames taken at `times_s` from a video of `duration_s`
    seconds (0 if not known), as a video processor that decoded the video and sampled the frames itself has
    it: their `timestamps` are `times_s`, their `sampled_fps` is frames / duration (of which Qwen2.5-VL's
    processor makes `second_per_grid_ts`), and `duration` is the video's (SmolVLM2's prompt says it). Frame
    positions are counted at that rate, so they are whole numbers only where the frames are evenly spaced.
    Without a duration the frames are taken as evenly spaced, one interval after the last; None (the
    processor's default, 24 fps, as stock on bare frames) without times, or without a duration and with
    fewer than two distinct times."""
    from transformers.video_utils import VideoMetadata

    if times_s is None:
        return None
    n, span = len(times_s), times_s[-1] - times_s[0]
    if duration_s <= 0:
        if n < 2 or span <= 0:
            return None
        duration_s = span * n / (n - 1)
    rate = n / duration_s  # frames a second: the sampled rate
    width, height = frames[0].size
    indices = [t * rate for t in times_s]  # frame positions at that rate
    return VideoMetadata(n, rate, width, height, duration_s, frames_indices=indices)


def clip_prepared(inputs, layout: tuple[Geometry, torch.Tensor], token_id: int) -> Prepared:
    """A clip's Prepared: the processor's `inputs` and the clip's geometry and source rows (a backend's
    `video_layout`), checked against the `token_id` placeholders the processor inserted."""
    geometry, source = layout
    n = int((inputs["input_ids"] == token_id).sum())
    assert n == len(geometry), f"processor inserted {n} visual tokens, geometry has {len(geometry)}"
    return Prepared(inputs, geometry, source, inputs["input_ids"].shape[1] - n, video=True)


def check_clip(frames: list, times_s: list[float] | None) -> None:
    """Refuse, with the reason, a clip a video processor cannot take: no frames, frames of several sizes,
    or a count of frame times other than the frames'."""
    if not frames:
        raise ExplorerError("a clip needs at least one frame")
    if times_s is not None and len(times_s) != len(frames):
        raise ExplorerError(f"{len(times_s)} frame times for {len(frames)} frames")
    if len({frame.size for frame in frames}) > 1:
        raise ExplorerError("the frames of a clip must all have one size")


@dataclass(frozen=True)
class _Grid:
    """The stitched crops as the LLM reads them, row by row: `lines` rows of `per_line` tokens, each row
    closed by a newline; token (i, j) has its centre at (centre_y, centre_x) in stitched-grid cells,
    where the grid read starts at cell (y0, x0) and each token spans (sy, sx) cells (1, 1 unless resampled)."""

    newline: torch.Tensor  # (G,) bool over the packed grid tokens
    lines: int
    per_line: int
    i: torch.Tensor  # (T,) row of each non-newline token
    j: torch.Tensor  # (T,) column
    y0: float
    x0: float
    sy: float
    sx: float

    @property
    def centre_y(self) -> torch.Tensor:
        return self.y0 + (self.i + 0.5) * self.sy

    @property
    def centre_x(self) -> torch.Tensor:
        return self.x0 + (self.j + 0.5) * self.sx


def anyres_layout(pack, unpad, image_size, pinpoints, tile: int, patch: int) -> tuple[Geometry, torch.Tensor]:
    """Geometry of an AnyRes image (LLaVA-NeXT, LLaVA-OneVision): a thumbnail ("base") of the whole
    image squashed to one tile, then the crops of the image resized into the best pinpoint without
    distortion and centred on padding, stitched into one grid, unpadded to the image's aspect ratio
    (and, in OneVision, downsampled), read row by row, each row closed by a newline.

    The order is the model's own: `pack(fields, newline)` runs the model's packing code on per-patch
    fields (crops, g*g, C) with `newline` (C,) for the newline token and returns (N, C); here each
    patch carries its row in the flat encoder output and its row and column in the stitched grid, so
    the packed result says which patches the LLM reads, in which order, and, when the grid was
    resampled, where each token samples it (bilinear resizing moves a linear field exactly).
    `unpad` is the model's unpad_image. A resampled token belongs to the crop that holds its centre.
    """
    height, width = image_size
    g = tile // patch  # tokens per crop side
    best = transformers.image_processing_utils.select_best_resolution((height, width), pinpoints)
    rows, cols = best[0] // tile, best[1] // tile  # crop grid
    packed = _packed(pack, rows, cols, g)  # (N, 3): flat encoder row, stitched row, stitched column
    base, stitched = packed[: g * g], packed[g * g :]
    grid = _read(stitched, unpad, image_size, rows, cols, g)
    tokens = g * g + (~grid.newline).nonzero()[:, 0]  # (T,) the grid's tokens in the packed sequence
    boxes = _boxes(grid, len(packed), tokens, image_size, best, tile, patch)
    partition, cells = _cells(grid, len(packed), tokens, rows, cols, g)
    source = torch.full((len(packed),), -1)
    source[: g * g] = base[:, 0].long()
    if grid.sy == grid.sx == 1:  # not resampled: every grid token is one patch of one crop
        source[tokens] = stitched[~grid.newline, 0].long()
    names = ("base", *(f"crop {r},{c}" for r in range(rows) for c in range(cols)), "newline")
    return Geometry(names, partition, cells, boxes.float(), (width, height)), source


def _packed(pack, rows: int, cols: int, g: int) -> torch.Tensor:
    """(N, 3) float64: the model's packing of each patch's (flat encoder row, stitched row, stitched
    column), the thumbnail first; newlines are (-1, NaN, NaN)."""
    crops = 1 + rows * cols  # thumbnail first
    cell = torch.arange(g * g)
    crop = torch.arange(crops)[:, None]
    y = torch.where(crop > 0, (crop - 1) // cols * g, 0) + cell // g  # (crops, g*g) row in the stitched grid
    x = torch.where(crop > 0, (crop - 1) % cols * g, 0) + cell % g
    index = torch.arange(crops * g * g).view(crops, g * g)
    fields = torch.stack([index, y, x], -1).double()  # (crops, g*g, 3)
    return pack(fields, torch.tensor([-1.0, math.nan, math.nan], dtype=torch.float64))


def _read(stitched: torch.Tensor, unpad, image_size, rows: int, cols: int, g: int) -> _Grid:
    """How the LLM reads the stitched grid, checked against where the packing put each token."""
    cells = torch.stack(torch.meshgrid(torch.arange(rows * g), torch.arange(cols * g), indexing="ij"))
    region = unpad(cells, tuple(image_size))  # (2, H, W) the cells left after unpadding
    y0, x0 = region[:, 0, 0].tolist() if region[0].numel() else (0, 0)
    newline = stitched[:, 0] < 0
    lines = int(newline.sum())  # rows of the grid the LLM reads, each closed by a newline
    per_line = (len(stitched) - lines) // max(lines, 1)  # 0 when unpadding left no column (a 1-px-wide image)
    sy, sx = region.shape[1] / max(lines, 1), region.shape[2] / max(per_line, 1)  # cells per token: 1 unless resampled
    k = torch.arange(lines * per_line)
    grid = _Grid(newline, lines, per_line, k // per_line, k % per_line, y0, x0, sy, sx)
    centres = torch.stack([grid.centre_y, grid.centre_x], 1).double() - 0.5
    torch.testing.assert_close(stitched[~newline, 1:], centres)
    return grid


def _boxes(grid: _Grid, n: int, tokens: torch.Tensor, image_size, best, tile: int, patch: int) -> torch.Tensor:
    """(N, 4) float64 pixel boxes on the original image: the thumbnail's cells stretched over the whole
    image, the grid's cells where the unpadded crops show them, NaN for newlines."""
    height, width = image_size
    g = tile // patch
    shape = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))
    new_h, new_w = transformers.image_processing_utils.get_patch_output_size(shape, best, "channels_first")
    lines_y = grid.y0 + torch.arange(grid.lines + 1) * grid.sy
    lines_x = grid.x0 + torch.arange(grid.per_line + 1) * grid.sx
    ys = _edges(lines_y, g, tile, patch, (best[0] - new_h) // 2, height / new_h, height)
    xs = _edges(lines_x, g, tile, patch, (best[1] - new_w) // 2, width / new_w, width)
    boxes = torch.full((n, 4), math.nan, dtype=torch.float64)
    cell = torch.arange(g * g)
    bi, bj = cell // g, cell % g  # the thumbnail is the whole image squashed to a square, its last cells stretched
    by = (torch.arange(g + 1) * patch * height / tile).double().index_fill_(0, torch.tensor([g]), height)
    bx = (torch.arange(g + 1) * patch * width / tile).double().index_fill_(0, torch.tensor([g]), width)
    boxes[: g * g] = torch.stack([bx[bj], by[bi], bx[bj + 1], by[bi + 1]], 1)
    i, j = grid.i, grid.j
    boxes[tokens] = torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]], 1)
    return boxes


def _cells(grid: _Grid, n: int, tokens: torch.Tensor, rows: int, cols: int, g: int):
    """(N,) partition of each token (a grid token belongs to the crop holding its centre; newlines
    last) and (N, 2) its cell, counted from its crop's top-left token."""
    crops = 1 + rows * cols
    partition = torch.full((n,), crops)  # newlines last
    partition[: g * g] = 0
    part = 1 + (grid.centre_y // g).long() * cols + (grid.centre_x // g).long()  # (T,) the crop holding each centre
    partition[tokens] = part
    cell = torch.arange(g * g)
    cells = torch.zeros(n, 2, dtype=torch.long)
    cells[: g * g] = torch.stack([cell // g, cell % g], 1)
    ij = torch.stack([grid.i, grid.j], 1)
    first = torch.full((crops, 2), n).scatter_reduce(0, part[:, None].expand(-1, 2), ij, "amin")
    cells[tokens] = ij - first[part]
    cells[g * g + grid.newline.nonzero()[:, 0], 0] = torch.arange(grid.lines)
    return partition, cells


def _edges(lines: torch.Tensor, g: int, tile: int, patch: int, offset: int, scale: float, limit: int) -> torch.Tensor:
    """Pixel positions on the original image of stitched-grid lines along one axis (g patches of
    `patch` px per `tile` px crop: a crop's unseen last pixels go to its last cell); the outermost
    are stretched to the image border, so the unpadded grid tiles the whole image."""
    crop, within = torch.div(lines.double(), g, rounding_mode="floor"), torch.remainder(lines.double(), g)
    edges = ((crop * tile + within * patch - offset) * scale).clamp(0, limit)
    edges[0], edges[-1] = 0, limit
    return edges


def clip_layout(frames: int, size: tuple[int, int], pooled: torch.Tensor, tile: int, patch: int) -> Geometry:
    """Geometry of a clip (LLaVA-OneVision's video): `frames` frames of (width, height) pixels, each squashed
    to one `tile`-px square of g x g patches (g = tile // patch), whose encoder outputs the model pools to a
    p x p grid; the frames' tokens one after the other, each frame's row by row, then one newline token.

    `pooled` (p*p, 2) float64 is where the model's own pooling samples each token of a frame, in (row,
    column) of the patch grid: the pooling run on each patch's (row, column), which bilinear resizing
    moves exactly. Each token's box is the part of the frame its cell of the p x p grid covers (g / p
    patches a side; a frame's unseen last pixels go to its last cell), checked against where the pooling
    samples it; the newline's box is NaN. Partitions: "frame 0", ..., "frame F-1", "newline"."""
    width, height = size
    g = tile // patch
    p = math.isqrt(len(pooled))
    span = g / p  # patches a side of one pooled token
    k = torch.arange(p * p)
    i, j = k // p, k % p  # (p*p,) each token's cell in its frame
    centres = torch.stack([(i + 0.5) * span, (j + 0.5) * span], 1).double() - 0.5  # in patch-centre coordinates
    torch.testing.assert_close(pooled, centres)
    lines = torch.arange(p + 1) * span
    ys = _edges(lines, g, tile, patch, 0, height / tile, height)
    xs = _edges(lines, g, tile, patch, 0, width / tile, width)
    frame = torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]], 1)  # (p*p, 4)
    nan = torch.full((1, 4), math.nan, dtype=torch.float64)
    boxes = torch.cat([frame.repeat(frames, 1), nan])  # (N, 4)
    partition = torch.arange(frames + 1).repeat_interleave(torch.tensor([p * p] * frames + [1]))  # (N,)
    cells = torch.cat([torch.stack([i, j], 1).repeat(frames, 1), torch.zeros(1, 2, dtype=torch.long)])
    names = (*(f"frame {f}" for f in range(frames)), "newline")
    return Geometry(names, partition, cells, boxes.float(), (width, height))
