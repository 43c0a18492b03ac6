"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 v2, github.com/Theia-4869/VisPruner;
the successor of FasterVLM, `cls`).

In every partition, of its share T of the budget:
1. important tokens: the top floor(important * T) by [CLS] attention of the feature layer;
2. diverse tokens: the others, in order of attention, lose their most duplicated members until the
   rest of T is left: each round splits them alternately into two sets A and B, scores every token
   of A by its highest cosine similarity to B (encoder outputs of the feature layer), and drops the
   r = min(8, what is still too many) highest of A.

Differs from the paper: as `cls` (FasterVLM), the budget, newlines included, is split over the
partitions in proportion to their sizes, and the newline share is spread evenly over the rows, where
the paper keeps T per crop and every newline on top.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives at the feature layer (mean over heads and queries) picks the important tokens
instead, as community ports do; a token that folds several patches gets their mean (see
`explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import CLS_FEATURE, HIDDEN_FEATURE, Method, Selection, Signals, fraction_of
from .common import by_size, spread, top


@dataclass(frozen=True)
class VisPruner(Method):
    important: float = field(
        default=0.5,
        metadata={
            "help": "share of each partition's tokens kept by [CLS] attention, the rest by diversity",
            "range": (0.0, 1.0),
        },
    )

    needs: ClassVar[tuple[str, ...]] = (CLS_FEATURE, HIDDEN_FEATURE)
    summary: ClassVar[str] = "VisPruner: top [CLS] tokens, then duplicates removed from the rest, in every crop"

    def select(self, s: Signals) -> Selection:
        g, scores = s.geometry, s[CLS_FEATURE]
        x = F.normalize(s[HIDDEN_FEATURE], dim=-1)  # (N, C)
        budgets = by_size(g, s.budget)
        keep, diverse = [], torch.zeros(len(g))
        for p, (name, k) in enumerate(zip(g.names, budgets)):
            if name == "newline":
                keep.append(spread(g, p, k))
                continue
            members = g.members(p)
            ranked = top(scores, members, len(members))  # (M,) by attention
            n = fraction_of(self.important, k)
            local = x[ranked.to(x.device)]  # (M, C) in order of attention
            rest = ranked[without_duplicates(local @ local.T, k - n, start=n)]
            keep += [ranked[:n], rest]
            diverse[rest] = 1.0
        return Selection(
            keep=torch.cat(keep).sort().values,
            scores=scores,
            budgets=dict(zip(g.names, budgets)),
            maps={"diverse": diverse},
        )


def without_duplicates(similarity: torch.Tensor, k: int, start: int = 0, per_round: int = 8) -> torch.Tensor:
    """The k of tokens start, start + 1, ... (rows of the (M, M) cosine `similarity`, in this order)
    left after dropping, round after round, the most duplicated, as VisPruner does."""
    tokens = torch.arange(start, len(similarity), device=similarity.device)
    if k == 0:
        return tokens[:0].cpu()
    while (r := min(per_round, len(tokens) - k)) > 0:
        a, b = tokens[::2], tokens[1::2]
        duplication = similarity[a[:, None], b].max(1).values  # (|A|,)
        tokens = torch.cat([a[duplication.argsort(descending=True, stable=True)[r:]], b])
    return tokens.cpu()
