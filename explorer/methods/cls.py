"""[CLS]-attention top-k in every partition: FasterVLM (Zhang et al., 2024, "[CLS] Attention is All
You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster", arXiv 2412.01818).

In each partition, keep the tokens the vision encoder's [CLS] token attends to most at the feature
layer (the layer whose output the LLM receives, the penultimate in llava-hf 1.6), heads summed (the
paper averages them: the same ranking). Its successor is VisPruner (`vispruner`).

Differs from the paper's code: FasterVLM's code (github.com/Theia-4869/FasterVLM) keeps the same
count T in every crop the encoder saw and no newline, "29 * 5 = 145" tokens on LLaVA-NeXT's 2x2 grid
in its README, and never unpads (it sets the merge type to "spatial"), so its picks on padding reach
the LLM; here the budget, newlines included, is split over the partitions in proportion to their
sizes (145 on a square image: 29, 29, 29, 28, 28 for the thumbnail and the four crops, 2 for the
newlines), the newline share is spread evenly over the rows, and only real tokens are ranked.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives at the feature layer (mean over heads and queries) ranks the tokens instead, as
community ports do; a token that folds several patches gets their mean (see `explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import CLS_FEATURE, Method, Selection, Signals
from .common import by_size, spread, top


@dataclass(frozen=True)
class CLS(Method):
    needs: ClassVar[tuple[str, ...]] = (CLS_FEATURE,)
    summary: ClassVar[str] = "FasterVLM: top tokens by [CLS] attention of the feature layer, in every crop"

    def select(self, s: Signals) -> Selection:
        g, scores = s.geometry, s[CLS_FEATURE]
        budgets = by_size(g, s.budget)
        keep = [
            spread(g, p, k) if name == "newline" else top(scores, g.members(p), k)
            for p, (name, k) in enumerate(zip(g.names, budgets))
        ]
        return Selection(keep=torch.cat(keep).sort().values, scores=scores, budgets=dict(zip(g.names, budgets)))
