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


ATTENTION = ("cls", "cls-heads", "cls-onehead", "cls-logits")  # signal kinds recomputed from a layer's q/k
KINDS = (*ATTENTION, "keys", "hidden")  # what `encoder_signals` captures


@contextmanager
def encoder_signals(layers: torch.nn.ModuleList, wants: dict[int, set[str]]):
    """Capture what methods read from the chosen encoder layers during one forward pass.

    `wants` maps a layer to the kinds asked of it: "cls", the [CLS]-to-patch attention, heads summed;
    "cls-heads", the same per head;
    "cls-onehead", that attention with the heads joined into one over all channels, scaled by
    1/sqrt(channels) (PruMerge's); "cls-logits", the [CLS] row of q.k * scale before the softmax,
    heads averaged (GlobalCom2's); "keys", the layer's key projections; "hidden", the layer's output.
    Attention rows are recomputed from the layer's own q/k projections (hooks on q_proj and k_proj),
    so the encoder keeps running its fast attention kernel. Yields a dict filled during the forward
    pass: (kind, layer) -> float32 (crops, T-1) for the attention kinds ((crops, T-1, heads) for
    cls-heads), (crops, T-1, heads, head_dim)
    for keys and (crops, T-1, channels) for hidden, the [CLS] token left out and nothing renormalised.
    """
    out: dict[tuple[str, int], torch.Tensor] = {}
    cls_q: dict[int, torch.Tensor] = {}

    def on_q(layer):
        def hook(module, args, q):  # q: (crops, T, D)
            cls_q[layer] = q[:, :1]

        return hook

    def on_k(layer, kinds):
        attn = layers[layer].self_attn

        def hook(module, args, k):  # k: (crops, T, D)
            crops, t, dim = k.shape
            h, d = attn.num_heads, attn.head_dim
            if "keys" in kinds:
                out["keys", layer] = k[:, 1:].reshape(crops, t - 1, h, d).float()
            if not kinds & set(ATTENTION):
                return
            q, k = cls_q.pop(layer).float(), k.float()  # (crops, 1, D), (crops, T, D)
            if "cls-onehead" in kinds:
                out["cls-onehead", layer] = torch.softmax(q @ k.transpose(1, 2) * dim**-0.5, -1)[:, 0, 1:]
            q = q.reshape(crops, 1, h, d).transpose(1, 2)  # (crops, h, 1, d)
            k = k.reshape(crops, t, h, d).transpose(1, 2)  # (crops, h, T, d)
            logits = q @ k.transpose(-1, -2) * attn.scale  # (crops, h, 1, T)
            if "cls-logits" in kinds:
                out["cls-logits", layer] = logits.mean(1)[:, 0, 1:]  # (crops, T-1)
            rows = torch.softmax(logits, -1)[:, :, 0, 1:]  # (crops, h, T-1)
            if "cls" in kinds:
                out["cls", layer] = rows.sum(1)  # (crops, T-1)
            if "cls-heads" in kinds:
                out["cls-heads", layer] = rows.transpose(1, 2)  # (crops, T-1, h)

        return hook

    def on_output(layer):
        def hook(module, args, hidden):  # hidden: (crops, T, C)
            out["hidden", layer] = hidden[:, 1:].float()

        return hook

    handles = []
    try:
        for layer, kinds in sorted(wants.items()):
            attention = layers[layer].self_attn
            if kinds & set(ATTENTION):
                handles.append(attention.q_proj.register_forward_hook(on_q(layer)))
            if kinds & {*ATTENTION, "keys"}:
                handles.append(attention.k_proj.register_forward_hook(on_k(layer, kinds)))
            if "hidden" in kinds:
                handles.append(layers[layer].register_forward_hook(on_output(layer)))
        yield out
    finally:
        for handle in handles:
            handle.remove()
