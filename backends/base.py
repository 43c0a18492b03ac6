"""What every backend shares: the user-facing error, token geometry, device choice and signal hooks."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


class ExplorerError(Exception):
    """A problem the user can fix (bad image, budget, model, ...), reported as one clear message."""


@dataclass(frozen=True)
class Geometry:
    """Where each of the N visual tokens of one image sits, in the order the LLM reads them.

    Every partition except "newline" is a full rectangle of cells listed in raster order, so its
    tokens, sorted by LLM index, walk its grid row by row.
    """

    names: tuple[str, ...]  # partition names: "base", "crop R,C", ..., "newline"
    partition: torch.Tensor  # (N,) long, index into `names`
    cells: torch.Tensor  # (N, 2) long, (row, col) in the partition's grid; newline i is (i, 0)
    boxes: torch.Tensor  # (N, 4) float, (x0, y0, x1, y1) on the original image; NaN for newlines
    image_size: tuple[int, int]  # (width, height) of the original image

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


@dataclass(frozen=True)
class Prepared:
    """One image and prompt, ready for the model."""

    inputs: dict  # the processor's tensors, on the model's device
    geometry: Geometry
    source: torch.Tensor  # (N,) long: each visual token's row in the flat (crops * tokens) encoder output, -1 if none
    text_tokens: int  # prompt tokens that are not visual tokens


def pick_device(device: str | None = None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextmanager
def cls_attention(layers: torch.nn.ModuleList, which: set[int]):
    """Capture the [CLS]-to-patch attention of the chosen encoder layers, heads summed.

    The row is recomputed from the layer's own q/k projections (hooks on q_proj and k_proj), so the
    encoder keeps running its fast attention kernel. Yields a dict filled during the forward pass:
    layer -> (crops, T-1) float32, the [CLS] column left out and the rest not renormalised.
    """
    rows: dict[int, torch.Tensor] = {}
    cls_q: dict[int, torch.Tensor] = {}

    def on_q(layer):
        def hook(module, args, q):  # q: (crops, T, D)
            cls_q[layer] = q[:, :1]

        return hook

    def on_k(layer):
        attn = layers[layer].self_attn

        def hook(module, args, k):  # k: (crops, T, D)
            crops, t, _ = k.shape
            h, d = attn.num_heads, attn.head_dim
            q = cls_q.pop(layer).reshape(crops, 1, h, d).transpose(1, 2).float()  # (crops, h, 1, d)
            k = k.reshape(crops, t, h, d).transpose(1, 2).float()  # (crops, h, T, d)
            a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (crops, h, 1, T)
            rows[layer] = a.sum(1)[:, 0, 1:]  # (crops, T-1)

        return hook

    handles = []
    try:
        for layer in sorted(which):
            handles.append(layers[layer].self_attn.q_proj.register_forward_hook(on_q(layer)))
            handles.append(layers[layer].self_attn.k_proj.register_forward_hook(on_k(layer)))
        yield rows
    finally:
        for handle in handles:
            handle.remove()
