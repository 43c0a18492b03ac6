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

import numpy as np
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
    and (N,) each row's cosine distance to the nearest chosen one.

    The distance of i and j is 1 - x_i . x_j in fp32, the unit vectors' dot product rounded once, as
    if the whole (N, N) distance matrix were built; only the rows the walk reads are (`DistanceRows`),
    in products of a few rows whose last bit may differ from the whole matrix's, as between BLAS
    builds (the picks differ only where two distances are that close)."""
    rows = DistanceRows(F.normalize(features.float(), dim=-1))
    picked, to_set = farthest_walk(rows, rows.most_isolated(), k, exclude_picked=True)
    return torch.from_numpy(picked), torch.from_numpy(to_set).clamp(min=0)


def as_the_code(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy max-min as the official code computes it: in fp16, the first pick by the second-smallest
    distance of each column, kept tokens not excluded. (K,) the distinct picks in the order first picked,
    K <= k, and (N,) each row's distance to the nearest one."""
    x = features.half()
    x = x / x.norm(dim=-1, keepdim=True)  # (N, D) as the code normalises: no epsilon
    distance = 1 - x @ x.T  # (N, N) fp16
    first = int(distance.topk(2, dim=0, largest=False).values[1].argmax())
    rows = distance.cpu().numpy()  # (N, N) fp16
    picks, to_set = farthest_walk(lambda p, _: rows[p], first, k, exclude_picked=False)
    return torch.tensor(list(dict.fromkeys(picks.tolist()))), torch.from_numpy(to_set).float().clamp(min=0)


def farthest_walk(distances, first: int, k: int, exclude_picked: bool) -> tuple[np.ndarray, np.ndarray]:
    """The greedy walk of max-min diversity, on the host: (k,) the picks in order, `first` first, each
    next one the token farthest from the picks so far (the first of equal ones, as torch's argmax), and
    (N,) each token's distance to the nearest pick. `distances(p, to_set)`: pick p's (N,) numpy row,
    given each token's distance to the picks before it (None for the first). With `exclude_picked` a
    pick is never picked again: its distance to the set is -inf from then on."""
    picked = np.empty(k, dtype=np.int64)
    to_set = distances(first, None).copy()  # (N,)
    for t in range(k):
        picked[t] = to_set.argmax() if t else first
        np.minimum(to_set, distances(picked[t], to_set), out=to_set)
        if exclude_picked:
            to_set[picked[t]] = -np.inf
    return picked, to_set


class DistanceRows:
    """Rows of the cosine distance matrix 1 - x @ x.T of unit rows x (N, D), each computed once, when
    first read, in one matrix product with the `block` tokens then farthest from the walk's picks, its
    likely next picks. The walk reads the rows of its k picks, k / N of the whole product (about 1.3
    rows computed a pick on a 672x672 photo on LLaVA-NeXT at 20%, the first pick's search included)."""

    def __init__(self, x: torch.Tensor, block: int = 32):
        self.x, self.block = x, block  # (N, D)
        self.rows: list[np.ndarray] = []  # (N,) each, in the order computed
        self.slot = np.full(len(x), -1)  # (N,) each token's row in `rows`, -1 until computed

    def __call__(self, p: int, to_set: np.ndarray | None) -> np.ndarray:
        if self.slot[p] < 0:
            likely = [] if to_set is None else np.argpartition(-to_set, min(self.block, len(to_set) - 1))[: self.block]
            self.fill(np.append(p, likely).astype(np.int64))
        return self.rows[self.slot[p]]

    def fill(self, asked: np.ndarray) -> None:
        asked = np.unique(asked[self.slot[asked] < 0])
        self.slot[asked] = np.arange(len(self.rows), len(self.rows) + len(asked))
        self.rows += list((1 - self.x[torch.from_numpy(asked)] @ self.x.T).cpu().numpy())  # (B, N) one rounding each

    def most_isolated(self, sample: int = 64, block: int = 64) -> int:
        """The token farthest from its nearest other token (the first of equal ones). Each token's
        highest similarity to a sample of `sample` tokens bounds its nearest distance from above; whole
        rows are computed only for the tokens whose bound does not rule them out, highest bound first."""
        n = len(self.x)
        columns = torch.arange(0, n, max(1, n // sample))  # (S,)
        similar = (self.x @ self.x[columns].T).cpu().numpy()  # (N, S)
        similar[columns, np.arange(len(columns))] = -np.inf  # not itself
        bound = 1 - similar.max(1)  # (N,) at least each token's nearest distance, but for rounding
        order = np.argsort(-bound, kind="stable")  # (N,) the farthest bound first
        best, first = -np.inf, n
        for start in range(0, n, block):
            rows = order[start : start + block]  # (B,)
            if bound[rows[0]] + 1e-4 < best:  # a margin: these products may round differently from the rows'
                break
            self.fill(rows)
            near = np.stack([self.rows[i] for i in self.slot[rows]])  # (B, N) a copy
            near[np.arange(len(rows)), rows] = np.inf  # not itself
            near = near.min(1)  # (B,) each one's nearest distance
            ties = rows[near == near.max()]
            if near.max() > best or (near.max() == best and ties.min() < first):
                best, first = near.max(), int(ties.min())
        return first
