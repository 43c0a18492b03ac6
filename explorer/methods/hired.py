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
On a model that sees the image once, with no thumbnail (LLaVA-1.5, Qwen2-VL), it keeps the top B
tokens by [CLS] attention of the feature layer, alpha unused, as the official code does on LLaVA-1.5
(the same as `cls` there).

`paper_code=True` follows the official LLaVA-NeXT code (its modeling_llava_next.py), with B as the
code's total budget: the thumbnail keeps its top min(int(alpha * B), 576) tokens; the thumbnail's
raster order is cut into one run of rows per crop, and crop i gets int(c_i / sum(c) * (B - B_base)) of
the rest, c_i the content tokens in its run, remainders lost (equal shares when every c_i is zero,
where the code divides by zero); each crop keeps its top tokens among all 576 positions of its padded
crop (torch's topk, as the code, so equal scores fall as it leaves them), and the picks that fall on
padding are dropped when the grid is unpadded, so fewer than B tokens reach the LLM when the image
needs padding (`stats["padding picked"]` counts them). The code
sets B = int(rate * 576 * (1 + crops)), padding counted and newlines not: 576 at its rate 0.2 on a
2x2 grid, so give that count as the budget (`--tokens 576`) to run what the paper ran.

Differs from the paper's code: content is counted in 2-D on the image, where the code cuts the
thumbnail into row stripes, one per crop; the budget is a share of this image's real token count (at
0.2, 585 of the 2928 tokens of a square image, where the code's is 576 of its 5 x 576 positions) and
is met exactly, where the code floors each crop's share and loses the remainders, ranks each crop
over its padded positions and loses the picks on padding; budget the crops cannot hold goes back to
the thumbnail. On crop grids with unequal rows and columns (1x2, 1x3, ...) the code stitches the
crops transposed before it unpads (it unpacks `get_anyres_image_grid_shape`'s (rows, cols) as
(width, height)), so it feeds the LLM a band of the wrong positions there; `paper_code=True` keeps
the picks that are real tokens instead.

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

from ..core import CLS_0, CLS_FEATURE, ROWS, Geometry, Method, Selection, Signals, fraction_of, padded
from .common import allocate, encoder_grid, located, real_picks, top

PADDED_CLS = padded(CLS_FEATURE)


@dataclass(frozen=True)
class HiRED(Method):
    alpha: float = field(
        default=0.5,
        metadata={"help": "thumbnail's share of the budget; 1 - alpha of its tokens mark content", "range": (0.0, 1.0)},
    )
    paper_code: bool = field(
        default=False,
        metadata={
            "help": "as the official code: content in row stripes, shares floored, each crop ranked over its "
            "padded grid (picks on padding lost); the budget is the code's total"
        },
    )

    needs: ClassVar[tuple[str, ...]] = (CLS_0, CLS_FEATURE)  # for these settings; an instance names its own
    summary: ClassVar[str] = "HiRED: thumbnail share alpha, crop budgets by layer-0 content, top [CLS] tokens"

    def __post_init__(self):
        if self.paper_code:  # the crops' padded grids, as the official code ranks them
            object.__setattr__(self, "needs", (CLS_0, CLS_FEATURE, PADDED_CLS, ROWS))

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        if g.thumbnail is None:  # as the official code on LLaVA-1.5: one top-k, alpha unused
            real = torch.tensor([name != "newline" for name in g.names])[g.partition].nonzero()[:, 0]  # (M,)
            keep = top(s[CLS_FEATURE], real, s.budget)
            return Selection(keep=keep.sort().values, scores=s[CLS_FEATURE], budgets={g.names[0]: len(keep)})
        base = g.members(g.thumbnail)  # (N_base,) in raster order
        crops = g.crops
        content = self.content_tokens(s, base)
        counts = self.content_counts(g, crops, base, content)
        keep, budgets, stats = (self.official if self.paper_code else self.ours)(s, counts)
        content_map = torch.full((len(g),), math.nan)
        content_map[base] = s[CLS_0][base]
        chosen = torch.full((len(g),), math.nan)  # 1 for the content tokens, 0 for the rest of the thumbnail
        chosen[base] = 0.0
        chosen[content] = 1.0
        return Selection(
            keep=keep,
            scores=s[CLS_FEATURE],
            budgets=budgets | ({"newline": 0} if "newline" in g.names else {}),
            maps={"content": content_map, "content top": chosen},
            stats={"content count": {g.names[p]: c for p, c in zip(crops, counts)}} | stats,
        )

    def content_tokens(self, s: Signals, base: torch.Tensor) -> torch.Tensor:
        """The thumbnail's top floor((1 - alpha) * N_base) tokens by layer-0 attention; with paper_code, as
        the code: int(N_base * (1 - alpha)) of them by torch's topk (equal scores fall as it leaves them)."""
        if self.paper_code:
            return base[s[CLS_0][base].topk(int(len(base) * (1 - self.alpha))).indices]
        return top(s[CLS_0], base, fraction_of(1 - Fraction(str(self.alpha)), len(base)))

    def ours(self, s: Signals, counts: list[int]) -> tuple[torch.Tensor, dict, dict]:
        """The kept tokens, the budgets and no stats: the budget met exactly on the real tokens."""
        g, feature = s.geometry, s[CLS_FEATURE]
        base, crops = g.members(g.thumbnail), g.crops
        b_base = min(fraction_of(self.alpha, s.budget), len(base))
        shares = allocate(s.budget - b_base, counts, [len(g.members(p)) for p in crops])
        b_base = min(len(base), s.budget - sum(shares))  # what the crops cannot hold goes back
        keep = [top(feature, base, b_base)] + [top(feature, g.members(p), k) for p, k in zip(crops, shares)]
        budgets = {g.names[g.thumbnail]: b_base, **{g.names[p]: k for p, k in zip(crops, shares)}}
        return torch.cat(keep).sort().values, budgets, {}

    def official(self, s: Signals, counts: list[int]) -> tuple[torch.Tensor, dict, dict]:
        """The official code's picks over every crop's padded grid, those on real tokens kept, the picks per
        crop as budgets, and the picks that fell on padding."""
        scores = s[PADDED_CLS]  # (P, T') the thumbnail first
        crops, per_crop = scores.shape
        grid = encoder_grid(s, crops, per_crop)
        b_base = min(int(s.budget * self.alpha), per_crop)
        rest = min(s.budget - b_base, (crops - 1) * per_crop)
        c = torch.tensor(counts) if sum(counts) else torch.ones(crops - 1, dtype=torch.long)
        shares = ((c / c.sum()) * rest).int().clamp(max=per_crop).tolist() if rest > 0 else [0] * (crops - 1)
        keep, lost = [], {}
        for crop, k in enumerate([b_base, *shares]):
            tokens, lost[s.geometry.names[crop]] = real_picks(grid, crop, scores[crop].topk(k).indices)
            keep.append(tokens)
        budgets = dict(zip(s.geometry.names, [b_base, *shares]))
        return torch.cat(keep).sort().values, budgets, {"padding picked": lost}

    def content_counts(self, g: Geometry, crops: list[int], base: torch.Tensor, content: torch.Tensor) -> list[int]:
        """How many content tokens of the thumbnail fall in each crop."""
        if self.paper_code:  # the thumbnail's raster order cut into one run of rows per crop
            chunk = torch.searchsorted(base, content) * len(crops) // len(base)
            return torch.bincount(chunk, minlength=len(crops)).tolist()
        where = located(g, crops, content)  # (M,) which crop holds each content token's centre
        return torch.bincount(where[where >= 0], minlength=len(crops)).tolist()
