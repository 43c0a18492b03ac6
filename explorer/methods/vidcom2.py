"""VidCom2 (Liu, Wang, Ma and Zhang, "Video Compression Commander: Plug-and-Play Inference Acceleration for
Video Large Language Models", EMNLP 2025, arXiv 2505.14454; official code: github.com/xuyang-liu16/VidCom2,
token_compressor/vidcom2/vidcom2.py; vLLM runs it as `--video-retention-ratio`).

Before the LLM, on the projected tokens of the clip's frames (after LLaVA-OneVision's pooling, after
Qwen2-VL's merger; one frame or temporal group of frames at a time), reading no attention:
1. keep the half of the feature channels whose variance over the clip is lowest, and L2-normalise each
   token on them;
2. each token's similarity to the video's mean token and to its frame's mean token, a Gaussian kernel
   summed over five widths: sum over a in (1/8, 1/4, 1/2, 1, 2) of exp(-|x - mean|^2 / 2a);
3. frame uniqueness: minus the mean similarity of the frame's tokens to the video's mean; its softmax
   over the frames at `temperature` gives each frame a share of the budget, r (1 + p_f - mean p), so
   frames unlike the rest of the clip keep more;
4. within each frame, the tokens least like both means (the lowest sum of the two similarities).
Tokens outside frames (LLaVA-OneVision's newline after the last frame) are kept, as the official code
appends the newline after compressing, when the budget leaves every frame a token.

Differs from the paper: it follows the official code, whose similarity is the Gaussian kernel on the
low-variance half of the channels where the paper writes cosine similarity. Differs from the official
code: the budget is floor(r * N) of all N visual tokens, newline included, split over the frames by
largest remainder in proportion to r (1 + p_f - mean p), each at most its frame; the code rounds each
frame's r (1 + p_f - mean p) * M (at least 1, the rate capped at 1, tokens above the cap lost) and appends
the newline, so its total misses r * N by a few tokens (given the code's own count as the budget, the
shares and the kept tokens are the code's on the clips tests/test_vidcom2.py checks); here the scores are in
fp32, the code's in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURES, Method, Selection, Signals
from .common import allocate

WIDTHS = (1 / 8, 1 / 4, 1 / 2, 1, 2)  # the kernel's widths a: exp(-d^2 / 2a), a = 2^k for k = -3..1


@dataclass(frozen=True)
class VidCom2(Method):
    temperature: float = field(
        default=0.01,
        metadata={
            "help": "softmax temperature of the frames' uniqueness: lower gives the most unique frames more of the "
            "budget (the official 0.01)",
            "range": (0.0001, 10.0),
        },
    )

    needs: ClassVar[tuple[str, ...]] = (FEATURES,)
    requires: ClassVar[tuple[str, ...]] = ("clip",)
    on_clips: ClassVar[str] = "clip"
    summary: ClassVar[str] = (
        "VidCom2, video: frames unlike the clip keep more tokens; within each, the tokens least like the clip and frame"
    )

    def select(self, s: Signals) -> Selection:
        g, n = s.geometry, len(s.geometry)
        tokens = g.frame_grid()  # (T, M) each frame's tokens, in LLM order
        rows = s[FEATURES].index_select(0, tokens.flatten().to(s[FEATURES].device))  # (T * M, D) the frames' tokens
        video, frame = similarities(rows.float(), len(tokens))
        uniqueness = -video.mean(1)  # (T,)
        p = torch.softmax((uniqueness - uniqueness.max()) / self.temperature, 0)
        rates = (1 + p - p.mean()).tolist()  # (T,) each frame's budget relative to r, as the code's scales / r
        others = g.outside_frames()  # (n - T * M,)
        outside = others[: max(0, min(len(others), s.budget - len(tokens)))]  # the newline, when every frame has 1
        shares = allocate(s.budget - len(outside), [Fraction(x) for x in rates], [tokens.shape[1]] * len(tokens))
        score = -(video + frame)  # (T, M): high for tokens unlike the video and their frame
        ranked = tokens.gather(1, score.argsort(dim=1, descending=True, stable=True))  # (T, M) highest score first
        kept = ranked[torch.arange(tokens.shape[1]) < torch.tensor(shares)[:, None]]  # each frame's first shares[t]
        scores, unique = torch.full((n,), torch.nan), torch.full((n,), torch.nan)
        scores[tokens] = score
        unique[tokens] = uniqueness[:, None].expand_as(score)
        budgets = dict(zip([g.names[q] for q in g.frames], shares))
        budgets |= {g.names[q]: int((g.partition[outside] == q).sum()) for q in set(g.partition[others].tolist())}
        return Selection(
            keep=torch.cat([kept, outside]).sort().values,
            scores=scores,
            budgets=budgets,
            maps={"frame uniqueness": unique},
            stats={"uniqueness": {g.names[q]: u for q, u in zip(g.frames, uniqueness.tolist())}},
        )


def similarities(x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's similarity to the video's mean token and to its frame's: (T, M) each, for the (T * M, D)
    tokens of `frames` frames, on the half of the channels with the lowest variance, tokens normalised."""
    low = x.var(0, unbiased=False).topk(x.shape[1] // 2, largest=False).indices  # (D/2,)
    x = F.normalize(x.index_select(1, low).view(frames, -1, len(low)), dim=-1)  # (T, M, D/2): faster than x[:, low]
    return kernel(x, x.mean((0, 1), keepdim=True)).cpu(), kernel(x, x.mean(1, keepdim=True)).cpu()


def kernel(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(T, M) the Gaussian kernel of each token to `centre`, summed over the widths."""
    distance = ((x - centre) ** 2).sum(-1)  # (T, M)
    return sum(torch.exp(-distance / (2 * a)) for a in WIDTHS)
