"""GlobalCom2 (Liu, Wang, Han, Wang, Yuan, Song, Zheng, Zhang, Huang and Chen, "Compression with
Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration", AAAI 2026,
arXiv 2501.05179, github.com/xuyang-liu16/GlobalCom2).

The thumbnail guides the crops, with the [CLS] row of the last encoder layer as the code reads it
(q.k * scale before the softmax, heads averaged):
1. each crop's importance: the thumbnail's attention summed over the crop's region of the image,
   softmax with a temperature (10); crop i keeps (1 + p_i - mean(p)) times the thumbnail's ratio;
2. the thumbnail keeps its top tokens by its own attention;
3. a crop keeps its top tokens by its own attention plus the thumbnail's attention sampled
   bilinearly at the crop's tokens, each L2-normalised over the crop;
4. every newline token is kept.

Differs from the paper: the budget, newlines included, replaces the retention ratio: the newlines
take what they need (at most half the budget), and the rest is split between the thumbnail and the
crops in proportion to size times that factor, capped at each partition's size with the overflow
handed on, where the code floors every share and loses what a full crop cannot take; a crop's region
on the thumbnail is found from the tokens' boxes on the image (the code cuts the thumbnail grid into
equal blocks); kept thumbnail tokens stay in raster order, where the code sends them by score.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the scores each
patch receives before the softmax in the last layer, averaged over heads and queries, guide the
selection instead, as community ports do; a token that folds several patches gets their mean (see
`explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import CLS_LOGITS_LAST, Geometry, Method, Selection, Signals
from .common import allocate, located, spread, top


@dataclass(frozen=True)
class GlobalCom2(Method):
    temperature: float = field(
        default=10.0,
        metadata={"help": "softmax temperature that turns crop importance into retention", "range": (1.0, 100.0)},
    )

    requires: ClassVar[tuple[str, ...]] = ("thumbnail",)
    needs: ClassVar[tuple[str, ...]] = (CLS_LOGITS_LAST,)
    summary: ClassVar[str] = "GlobalCom2: the thumbnail's attention sets each crop's share and guides its top tokens"

    def select(self, s: Signals) -> Selection:
        g, attention = s.geometry, s[CLS_LOGITS_LAST]
        thumbnail, crops = g.thumbnail, g.crops
        base = g.members(thumbnail)  # (N_base,) in raster order
        newline = [p for p, name in enumerate(g.names) if name == "newline"]
        b_newline = min(sum(len(g.members(p)) for p in newline), s.budget // 2)

        where = located(g, crops, base)  # (N_base,) the crop holding each thumbnail token's centre
        region = torch.zeros(len(crops), dtype=torch.float64)
        region.index_add_(0, where[where >= 0], attention[base][where >= 0].double())  # (crops,)
        share = torch.softmax(region / self.temperature, 0)  # (crops,)
        factor = 1 + share - share.mean()  # a crop's ratio over the thumbnail's
        sizes = [len(base)] + [len(g.members(p)) for p in crops]
        weights = [Fraction(sizes[0])] + [Fraction(float(f)) * n for f, n in zip(factor, sizes[1:])]
        shares = allocate(s.budget - b_newline, weights, sizes)

        in_crops = torch.isin(g.partition, torch.tensor(crops, dtype=torch.long)).nonzero()[:, 0]
        guide = thumbnail_at(g, thumbnail, attention, in_crops)  # (N,) NaN outside the crops
        combined = torch.full((len(g),), torch.nan)
        keep = [top(attention, base, shares[0])]
        for p, k in zip(crops, shares[1:]):
            members = g.members(p)
            combined[members] = F.normalize(attention[members], dim=0) + F.normalize(guide[members], dim=0)
            keep.append(top(combined, members, k))
        keep += [spread(g, p, b_newline) for p in newline]
        budgets = {g.names[p]: k for p, k in zip([thumbnail, *crops], shares)}
        return Selection(
            keep=torch.cat(keep).sort().values,
            scores=attention,
            budgets={**budgets, **{g.names[p]: b_newline for p in newline}},
            maps={"crop score": combined, "thumbnail guide": guide},
            stats={"crop importance": {g.names[p]: float(x) for p, x in zip(crops, share)}},
        )


def thumbnail_at(g: Geometry, thumbnail: int, attention: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) the thumbnail's attention map sampled bilinearly at the centres of `tokens` on the image,
    as resizing the map onto the crops' grid would (edges clamped), NaN for the other tokens."""
    grid = attention[g.members(thumbnail)].view(1, 1, *g.grid(thumbnail)).float()  # (1, 1, rows, cols)
    width, height = g.image_size
    centre = (g.boxes[tokens, :2] + g.boxes[tokens, 2:]) / 2  # (M, 2) as (x, y)
    at = centre / torch.tensor([width, height]) * 2 - 1  # (M, 2) in [-1, 1]
    sampled = F.grid_sample(grid, at.view(1, 1, -1, 2), mode="bilinear", padding_mode="border", align_corners=False)
    out = torch.full((len(g),), torch.nan)
    out[tokens] = sampled.view(-1)
    return out
