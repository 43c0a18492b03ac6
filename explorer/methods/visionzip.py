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
of a partition's T tokens, contextual = 10/64 by default. Newline tokens are dropped, as in the paper.

Differs from the paper: the budget, split over the partitions in proportion to their sizes, replaces
the fixed D + C per crop, and newlines get only what the other partitions cannot hold (so a budget of
N keeps everything); the [CLS] token is not one of the LLM's visual tokens in llava-hf, so all D
dominant tokens are patches where the paper spends one on [CLS]; contextual tokens stay at their
target's place in LLM order instead of being appended after the dominant ones.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives at the feature layer (mean over heads and queries) picks the dominant tokens instead,
as community ports do; a token that folds several patches gets their mean (see `explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import CLS_FEATURE, HIDDEN_FEATURE, KEYS_FEATURE, Method, Selection, Signals, fraction_of
from .common import merge_weights, patches_first, spread, top


@dataclass(frozen=True)
class VisionZip(Method):
    contextual: float = field(
        default=0.15625,
        metadata={"help": "share of each partition's tokens that are merged contextual tokens", "range": (0.0, 1.0)},
    )

    needs: ClassVar[tuple[str, ...]] = (CLS_FEATURE, KEYS_FEATURE, HIDDEN_FEATURE)
    summary: ClassVar[str] = "VisionZip: top [CLS] tokens + contextual tokens merged by key similarity, per crop"

    def select(self, s: Signals) -> Selection:
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
            is_target = torch.zeros(len(rest), dtype=torch.bool)
            is_target[torch.arange(0, len(rest), max(1, len(rest) // c))[:c]] = True
            targets, others = rest[is_target], rest[~is_target]  # (C,), (n - C,)
            similarity = keys[others.to(keys.device)] @ keys[targets.to(keys.device)].T  # (n - C, C)
            groups[targets] = targets
            groups[others] = targets[similarity.argmax(1).cpu()]
            contextual[targets] = 1.0
        keep = (groups == torch.arange(len(g))).nonzero()[:, 0]  # (K,) sorted
        return Selection(
            keep=keep,
            scores=scores,
            groups=groups,
            weights=plus_mean_of_joined(groups, keep),
            budgets=dict(zip(g.names, budgets)),
            maps={"contextual": contextual},
        )


def plus_mean_of_joined(groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(K, N) sparse weights: each kept token carries itself plus the mean of the tokens that joined it."""
    joined = ((groups >= 0) & (groups != torch.arange(len(groups)))).nonzero()[:, 0]  # (M,)
    count = torch.bincount(groups[joined], minlength=len(groups))  # (N,) how many joined each token
    return merge_weights(keep, len(groups), groups[joined], joined, 1.0 / count[groups[joined]])
