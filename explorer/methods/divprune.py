"""DivPrune (Alvar, Singh, Akbari and Zhang, "DivPrune: Diversity-based Visual Token Pruning for
Large Multimodal Models", CVPR 2025, arXiv 2503.02175).

Keeps the most diverse set of the projected visual tokens, the LLM's own input: the max-min
diversity problem, solved greedily with the cosine distance 1 - cos:
1. first the token farthest from its nearest neighbour;
2. then, again and again, the token farthest from the kept set (from the nearest kept token),
until the budget is met. One selection over the whole image, newline tokens included, as the
paper does on LLaVA-NeXT. Written from the paper: the official code's licence (CC BY-NC 4.0) does
not allow reuse.

Differs from the paper: the budget is floor(r * N) like every method here, where the paper rounds;
a token already kept is never picked again, even when all that is left duplicates kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURES, Method, Selection, Signals


@dataclass(frozen=True)
class DivPrune(Method):
    needs: ClassVar[tuple[str, ...]] = (FEATURES,)
    summary: ClassVar[str] = "DivPrune: the most diverse tokens, greedy max-min cosine distance over the image"

    def select(self, s: Signals) -> Selection:
        picked, distance = max_min_diverse(s[FEATURES], s.budget)  # (B,) in the order picked, (N,)
        early = torch.full((len(s.geometry),), torch.nan)
        early[picked] = 1 - torch.arange(len(picked), dtype=torch.float) / len(picked)  # 1 for the first
        return Selection(keep=picked.sort().values, maps={"picked early": early, "distance to kept": distance})


def max_min_diverse(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k,) indices of rows of `features` (N, D), greedily chosen to be far apart in cosine distance,
    and (N,) each row's cosine distance to the nearest chosen one."""
    x = F.normalize(features.float(), dim=-1)  # (N, D)
    distance = 1 - x @ x.T  # (N, N)
    picked = torch.empty(k, dtype=torch.long, device=x.device)
    picked[0] = distance.fill_diagonal_(torch.inf).min(1).values.argmax()  # not its own neighbour
    distance.fill_diagonal_(-torch.inf)  # from now on: a picked token is never picked again
    # (N,) each token's distance to the nearest picked one; index_select keeps the loop free of GPU syncs
    to_set = distance.index_select(0, picked[:1])[0]
    for t in range(1, k):
        picked[t] = to_set.argmax()
        to_set = torch.minimum(to_set, distance.index_select(0, picked[t : t + 1])[0])
    return picked.cpu(), to_set.clamp(min=0).cpu()
