"""EVS, Efficient Video Sampling (Bagrov, Khvedchenia, Tymchenko et al., NVIDIA, "Efficient Video Sampling:
Pruning Temporally Redundant Tokens for Faster VLM Inference", arXiv 2510.14624; the code is vLLM's
vllm/multimodal/evs.py `compute_retention_mask`, run by `video_pruning_rate` on Qwen2.5-VL, Qwen3-VL and
others, and SGLang's port).

Drops the tokens of a static scene: on the projected tokens (after the merger, what the LLM receives), each
token's change is 1 - cos(x, x') to the token at the same place in the previous frame (or temporal group of
frames); the first frame, having no previous one, ranks above every token and is kept whole, then the
budget goes to the tokens that changed most, over the whole clip at once, so a frame where something moves
keeps more than one where nothing does. Ties go to the earlier token (vLLM's stable sort). Tokens outside
frames (LLaVA-OneVision's newline after the last frame, which vLLM's models do not have) rank with the first
frame, after it in LLM order. Reads no attention.

Differs from vLLM's code: the budget is floor(r * N), where vLLM keeps int(N * (1 - q)) in floating point (q =
1 - r the pruning rate, so 0.1 of 1960 tokens is 195 there, 196 here) and at least the whole first frame, so
below one frame's worth it keeps more than asked; here the first frame's first B tokens, in vLLM's rank
order; the change is computed in fp32, vLLM's in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURES, Method, Selection, Signals


@dataclass(frozen=True)
class EVS(Method):
    needs: ClassVar[tuple[str, ...]] = (FEATURES,)
    requires: ClassVar[tuple[str, ...]] = ("clip",)
    on_clips: ClassVar[str] = "clip"
    summary: ClassVar[str] = (
        "EVS, video: the first frame whole, then the tokens that changed most from the same place a frame before"
    )

    def select(self, s: Signals) -> Selection:
        g, n = s.geometry, len(s.geometry)
        tokens = g.frame_grid()  # (T, M) each frame's tokens, in raster order
        x = s[FEATURES][tokens.to(s[FEATURES].device)].float()  # (T, M, D)
        change = torch.full((n,), torch.nan)
        change[tokens[1:]] = (1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)).cpu()  # (T-1, M)
        rank = change.nan_to_num(torch.inf)  # the first frame and the tokens outside frames first
        keep = torch.argsort(rank, descending=True, stable=True)[: s.budget].sort().values  # (B,)
        kept = torch.bincount(g.partition[keep], minlength=len(g.names)).tolist()
        return Selection(
            keep=keep,
            scores=change,
            budgets=dict(zip(g.names, kept)),
            maps={"change from previous frame": change},
            stats={"mean change": {g.names[p]: change[t].mean().item() for p, t in zip(g.frames[1:], tokens[1:])}},
        )
