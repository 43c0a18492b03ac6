"""HiRED: High-Resolution Early Dropping (Arif, Yoon, Nikolopoulos, Vandierendonck, John and Ji,
AAAI 2025, arXiv 2408.10945, github.com/hasanar1f/HiRED).

Spends the budget B where the image has content, before the LLM sees a single token:
1. the thumbnail ("base"; SmolVLM's "global") gets B_base = min(floor(alpha * B), N_base);
2. each crop's content score counts how many of the thumbnail's top floor((1 - alpha) * N_base)
   tokens by layer-0 [CLS] attention have their centre inside the part of the image the crop shows;
3. the crops share B - B_base in proportion to those counts (largest remainder, capped at each
   crop's real token count, overflow handed on; by crop size when every count is zero);
4. every partition keeps its top tokens by [CLS] attention of the feature layer, heads summed;
5. newline tokens are dropped.

Differs from the paper's code: content is counted in 2-D on the image, where the code cuts the
thumbnail into row stripes, one per crop (`paper_code=True` does that); the budget is a share of
this image's real token count and is met exactly, where the code floors each share and loses the
remainders; budget the crops cannot hold goes back to the thumbnail.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives (mean over heads and queries) gives both the layer-0 content map and the feature-
layer ranking instead, as community ports do; a token that folds several patches gets their mean
(see `explorer.Signals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch

from ..core import CLS_0, CLS_FEATURE, Geometry, Method, Selection, Signals, fraction_of
from .common import allocate, located, top


@dataclass(frozen=True)
class HiRED(Method):
    alpha: float = field(
        default=0.5,
        metadata={"help": "thumbnail's share of the budget; 1 - alpha of its tokens mark content", "range": (0.0, 1.0)},
    )
    paper_code: bool = field(
        default=False, metadata={"help": "count content in row stripes of the thumbnail, as the official code"}
    )

    requires: ClassVar[tuple[str, ...]] = ("thumbnail",)
    needs: ClassVar[tuple[str, ...]] = (CLS_0, CLS_FEATURE)
    summary: ClassVar[str] = "HiRED: thumbnail share alpha, crop budgets by layer-0 content, top [CLS] tokens"

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        base = g.members(g.thumbnail)  # (N_base,) in raster order
        crops = g.crops
        content = top(s[CLS_0], base, fraction_of(1 - Fraction(str(self.alpha)), len(base)))
        counts = self.content_counts(g, crops, base, content)
        b_base = min(fraction_of(self.alpha, s.budget), len(base))
        shares = allocate(s.budget - b_base, counts, [len(g.members(p)) for p in crops])
        b_base = min(len(base), s.budget - sum(shares))  # what the crops cannot hold goes back

        feature = s[CLS_FEATURE]
        keep = [top(feature, base, b_base)] + [top(feature, g.members(p), k) for p, k in zip(crops, shares)]
        content_map = torch.full((len(g),), math.nan)
        content_map[base] = s[CLS_0][base]
        chosen = torch.full((len(g),), math.nan)  # 1 for the content tokens, 0 for the rest of the thumbnail
        chosen[base] = 0.0
        chosen[content] = 1.0
        return Selection(
            keep=torch.cat(keep).sort().values,
            scores=feature,
            budgets={g.names[g.thumbnail]: b_base, **{g.names[p]: k for p, k in zip(crops, shares)}}
            | ({"newline": 0} if "newline" in g.names else {}),
            maps={"content": content_map, "content top": chosen},
            stats={"content count": {g.names[p]: c for p, c in zip(crops, counts)}},
        )

    def content_counts(self, g: Geometry, crops: list[int], base: torch.Tensor, content: torch.Tensor) -> list[int]:
        """How many content tokens of the thumbnail fall in each crop."""
        if self.paper_code:  # the thumbnail's raster order cut into one run of rows per crop
            chunk = torch.searchsorted(base, content) * len(crops) // len(base)
            return torch.bincount(chunk, minlength=len(crops)).tolist()
        where = located(g, crops, content)  # (M,) which crop holds each content token's centre
        return torch.bincount(where[where >= 0], minlength=len(crops)).tolist()
