"""DivPrune (Alvar, Singh, Akbari and Zhang, "DivPrune: Diversity-based Visual Token Pruning for
Large Multimodal Models", CVPR 2025, arXiv 2503.02175).

Keeps the most diverse set of the projected visual tokens, the LLM's own input: the max-min
diversity problem, solved greedily with the cosine distance 1 - cos:
1. first the token farthest from its nearest neighbour;
2. then, again and again, the token farthest from the kept set (from the nearest kept token),
until the budget is met. One selection over the whole image, newline tokens included, as the
paper does on LLaVA-NeXT. Written from the paper and the official code's logic, not its text: that
code's licence (CC BY-NC 4.0) does not allow reuse.

`paper_code=True` computes as the official code (LLaVA/llava/model/llava_arch.py): the cosine
distances in fp16, the model's dtype there; the first pick the token whose second-smallest distance
in its column of the distance matrix is largest (the smallest being its own, about 0); and kept
tokens not excluded, so when all that is left duplicates kept tokens the code picks a kept one again
and feeds it twice, where here it is kept once (fewer than B). The code's budget is round(r * N);
give that count as the budget to match it.

Differs from the paper's code: the budget is floor(r * N) like every method here, where the code
rounds (r = 0.1 of 576 tokens: 57 here, 58 there); the distances are computed in fp32, where the
code works in the model's fp16, so near-ties can go the other way and the greedy chain then differs
from that pick on; a token already kept is never picked again, even when all that is left duplicates
kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURES, Method, Selection, Signals


@dataclass(frozen=True)
class DivPrune(Method):
    paper_code: bool = field(
        default=False,
        metadata={"help": "as the official code: distances in fp16, its first pick, kept tokens may be picked again"},
    )

    needs: ClassVar[tuple[str, ...]] = (FEATURES,)
    summary: ClassVar[str] = "DivPrune: the most diverse tokens, greedy max-min cosine distance over the image"

    def select(self, s: Signals) -> Selection:
        greedy = as_the_code if self.paper_code else max_min_diverse
        picked, distance = greedy(s[FEATURES], s.budget)  # (B,) in the order picked, (N,)
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


def as_the_code(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy max-min as the official code computes it: in fp16, the first pick by the second-smallest
    distance of each column, kept tokens not excluded. (K,) the distinct picks in the order first picked,
    K <= k, and (N,) each row's distance to the nearest one."""
    x = features.half()
    x = x / x.norm(dim=-1, keepdim=True)  # (N, D) as the code normalises: no epsilon
    distance = 1 - x @ x.T  # (N, N) fp16
    picks = [int(distance.topk(2, dim=0, largest=False).values[1].argmax())]
    to_set = distance[picks[0]]  # (N,) per column, the distance to the nearest pick (rows of the picks)
    for _ in range(1, k):
        picks.append(int(to_set.argmax()))
        to_set = torch.minimum(to_set, distance[picks[-1]])
    return torch.tensor(list(dict.fromkeys(picks))), to_set.float().clamp(min=0).cpu()
