"""VisionZip (Yang, Chen, Tian, Wang, Li, Yu and Jia, "VisionZip: Longer is Better but Not Necessary
in Vision Language Models", CVPR 2025, arXiv 2412.04467, github.com/dvlab-research/VisionZip).

In every partition (the thumbnail and each crop, as the paper applies it to each part of the image):
1. dominant tokens: the top D by [CLS] attention of the feature layer, heads summed;
2. contextual tokens: C targets evenly spaced over the remaining tokens (every (n // C)-th of the n
   left, in raster order); every other remaining token joins the target whose key (feature layer,
   heads averaged) is most cosine-similar;
3. a target reaches the LLM as its own encoder output plus the mean of those that joined it, before
   the projector (`Selection.weights`); dominant tokens reach it unchanged.
The paper keeps 54 + 10 of 64, 108 + 20 of 128 and 162 + 30 of 192 tokens: C = floor(contextual * T)
of a partition's T tokens, contextual = 10/64 by default. Newline tokens get only what the other
partitions cannot hold (so a budget of N keeps everything).

`paper_code=True` follows the official code on LLaVA-NeXT (visionzip/clip_encoder.py and
llava_arch.py): every crop the encoder saw, the thumbnail included, gets the same T = B // (1 + crops)
(the remainder unspent), C = floor(contextual * T) of them contextual; [CLS] is one of its T - C
dominant tokens, so T - C - 1 patches are dominant; and each crop is ranked, split into targets and
merged over all 576 positions of its padded crop, padding included (with torch's topk, as the code).
The code never unpads, so it
feeds the LLM every crop's [CLS] and the picks on padding too, and no newline; llava-hf's LLM has
no place for those, so only the picks on real tokens are kept here, fewer than B
(`stats["padding picked"]` counts the rest), and a target's mean leaves out the padding that joined
it. The paper's 64 per crop on a 2x2 grid is B = 320 (`--tokens 320`).

Differs from the paper: the budget, split over the partitions in proportion to their sizes, replaces
the fixed D + C per crop, and newlines get what the other partitions cannot hold, where the code
keeps none on LLaVA-NeXT (one after a single-crop image); the [CLS] token is not one of the LLM's
visual tokens in llava-hf, so all D dominant tokens are patches where the paper spends one on
[CLS] (at 64 per crop: 54 dominant patches here, 53 there); it works on the real tokens only, where
the code ranks and keeps the padding of LLaVA-NeXT's crops too; contextual tokens stay at their
target's place in LLM order instead of being appended after the dominant ones, with every crop's
[CLS].

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives at the feature layer (mean over heads and queries) picks the dominant tokens instead,
as community ports do; a token that folds several patches gets their mean (see `explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import (
    CLS_FEATURE,
    HIDDEN_FEATURE,
    KEYS_FEATURE,
    ROWS,
    Method,
    Selection,
    Signals,
    fraction_of,
    padded,
)
from .common import encoder_grid, merge_weights, patches_first, spread, top

PADDED = (padded(CLS_FEATURE), padded(KEYS_FEATURE), ROWS)  # what paper_code reads besides `needs`


@dataclass(frozen=True)
class VisionZip(Method):
    contextual: float = field(
        default=0.15625,
        metadata={"help": "share of each partition's tokens that are merged contextual tokens", "range": (0.0, 1.0)},
    )
    paper_code: bool = field(
        default=False,
        metadata={
            "help": "as the official code: the same count in every crop, [CLS] one of the dominant tokens, "
            "each crop ranked and merged over its padded grid (picks on padding lost)"
        },
    )

    needs: ClassVar[tuple[str, ...]] = (CLS_FEATURE, KEYS_FEATURE, HIDDEN_FEATURE)  # an instance names its own
    summary: ClassVar[str] = "VisionZip: top [CLS] tokens + contextual tokens merged by key similarity, per crop"

    def __post_init__(self):
        if self.paper_code:  # the crops' padded grids, as the official code ranks them
            object.__setattr__(self, "needs", (*type(self).needs, *PADDED))

    def select(self, s: Signals) -> Selection:
        if self.paper_code:
            return self.official(s)
        g, scores = s.geometry, s[CLS_FEATURE]
        keys = F.normalize(s[KEYS_FEATURE].mean(1), dim=-1)  # (N, head_dim), heads averaged
        budgets = patches_first(g, s.budget)
        groups = torch.full((len(g),), -1)  # (N,)
        contextual = torch.zeros(len(g))  # (N,) 1 for the targets, a map worth showing
        for p, (name, k) in enumerate(zip(g.names, budgets)):
            if name == "newline":
                kept = spread(g, p, k)
                groups[kept] = kept
                continue
            members, c = g.members(p), fraction_of(self.contextual, k)
            dominant = top(scores, members, k - c)
            groups[dominant] = dominant
            if c == 0:
                continue
            rest = members[~torch.isin(members, dominant)]  # (n,) in raster order
            targets, others, into = contextual_groups(keys, rest, c)
            groups[targets] = targets
            groups[others] = into
            contextual[targets] = 1.0
        return selection(groups, scores, dict(zip(g.names, budgets)), contextual)

    def official(self, s: Signals) -> Selection:
        """The official code's picks over every crop's padded grid, those on real tokens kept."""
        scores = s[padded(CLS_FEATURE)]  # (P, T') the thumbnail first
        crops, per_crop = scores.shape
        grid = encoder_grid(s, crops, per_crop)  # (P, T') the token at each position, -1 for padding
        keys = F.normalize(s[padded(KEYS_FEATURE)].mean(2), dim=-1)  # (P, T', head_dim), heads averaged
        t = s.budget // crops
        c = fraction_of(self.contextual, t)
        groups = torch.full((len(s.geometry),), -1)  # (N,)
        contextual = torch.zeros(len(s.geometry))
        lost = {}
        for crop, token in enumerate(grid):  # token: (T',)
            positions = torch.arange(per_crop)
            dominant = scores[crop].topk(max(t - c - 1, 0)).indices  # [CLS] is one of the T - C
            rest = positions[~torch.isin(positions, dominant)]  # (n,) in raster order, padding included
            targets, others, into = contextual_groups(keys[crop], rest, c)
            kept = torch.cat([dominant, targets])
            groups[token[kept][token[kept] >= 0]] = token[kept][token[kept] >= 0]
            joined = token[others] >= 0  # a real token whose target is padding is dropped with it
            groups[token[others][joined]] = token[into][joined]
            contextual[token[targets][token[targets] >= 0]] = 1.0
            lost[s.geometry.names[crop]] = int((token[kept] < 0).sum())
        budgets = {name: t if name != "newline" else 0 for name in s.geometry.names}
        return selection(groups, s[CLS_FEATURE], budgets, contextual, {"padding picked": lost})


def contextual_groups(keys: torch.Tensor, rest: torch.Tensor, c: int):
    """VisionZip's contextual step on the tokens `rest` (in raster order) with unit `keys` (rows indexed by
    them): (C,) the targets, every (n // C)-th from the first, (n - C,) the others, and (n - C,) the target
    each other joins, the most cosine-similar."""
    if c == 0:
        return rest[:0], rest[:0], rest[:0]
    is_target = torch.zeros(len(rest), dtype=torch.bool)
    is_target[torch.arange(0, len(rest), max(1, len(rest) // c))[:c]] = True
    targets, others = rest[is_target], rest[~is_target]  # (C,), (n - C,)
    similarity = keys[others.to(keys.device)] @ keys[targets.to(keys.device)].T  # (n - C, C)
    return targets, others, targets[similarity.argmax(1).cpu()]


def selection(groups: torch.Tensor, scores, budgets: dict, contextual, stats=None) -> Selection:
    """The Selection of `groups` (N,): each token's kept token, -1 for dropped ones."""
    keep = (groups == torch.arange(len(groups))).nonzero()[:, 0]  # (K,) sorted
    return Selection(
        keep=keep,
        scores=scores,
        groups=groups,
        weights=plus_mean_of_joined(groups, keep),
        budgets=budgets,
        maps={"contextual": contextual},
        stats=stats or {},
    )


def plus_mean_of_joined(groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(K, N) sparse weights: each kept token carries itself plus the mean of the tokens that joined it."""
    joined = ((groups >= 0) & (groups != torch.arange(len(groups)))).nonzero()[:, 0]  # (M,)
    count = torch.bincount(groups[joined], minlength=len(groups))  # (N,) how many joined each token
    return merge_weights(keep, len(groups), groups[joined], joined, 1.0 / count[groups[joined]])
