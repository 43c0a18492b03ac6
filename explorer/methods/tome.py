"""Token merging by bipartite soft matching: ToMe (Bolya, Fu, Dai, Zhang, Feichtenhofer and Hoffman,
"Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461, github.com/facebookresearch/ToMe).

ToMe does not drop tokens: it merges the most alike ones, so that what a token saw survives in its
partner. In a round, the tokens are dealt alternately into two sides, A and B; every A token finds
its most similar B token (cosine similarity of the attention keys, heads averaged); the A tokens with
the most similar partners are merged into them, and a merged token is the size-weighted mean of the
tokens it holds, so every original token counts once. Rounds repeat on what is left until the
partition's budget is met; a round merges at most the A side, about half the tokens. Each kept token
reaches the LLM as the mean of the encoder outputs of all the cells it holds (`Selection.groups`
colours them on the overlay).

Differs from the paper: ToMe merges r tokens inside every vision block and runs the rest of the
encoder on the merged tokens, with proportional attention (log size added to the attention logits);
here the encoder runs unchanged and the matching runs once, after it, on the feature layer's keys,
in as many rounds as the budget needs (r per round = what is still to merge, at most the A side),
with the keys of a merged token taken as the sum of its members' keys. It works per partition (the
thumbnail and each crop), the budget split over them in proportion to their sizes, and newline
tokens get only what the other partitions cannot hold (spread evenly); a merged token stays at the
place of its B token in LLM order, where ToMe appends the merged tokens after the unmerged ones.
Merging inside the blocks, as the paper does, is `tome-vit`; it runs on LLaVA-NeXT, LLaVA-1.5 and
LLaVA-OneVision (unless it resamples the grid), because on the other families the LLM's tokens are
made from the encoder's patches after the encoder (SmolVLM folds 4x4 patches and Qwen2-VL 2x2), so a
group of merged patches is not a set of whole tokens there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import HIDDEN_FEATURE, KEYS_FEATURE, Geometry, Method, Selection, Signals
from .common import patches_first, spread


@dataclass(frozen=True)
class ToMe(Method):
    needs: ClassVar[tuple[str, ...]] = (KEYS_FEATURE, HIDDEN_FEATURE)
    summary: ClassVar[str] = "ToMe: bipartite soft matching merges the most alike tokens, per crop, until the budget"

    def select(self, s: Signals) -> Selection:
        return merge_by_partition(s.geometry, s[KEYS_FEATURE].mean(1), s.budget)  # keys: heads averaged


def merge_by_partition(g: Geometry, metric: torch.Tensor, budget: int) -> Selection:
    """Bipartite soft matching on `metric` (N, C) in each partition until the budget, split as ToMe
    splits it: each kept token carries the mean of its group."""
    keys = metric.float().cpu()  # (N, C)
    budgets = patches_first(g, budget)
    groups = torch.full((len(g),), -1)  # (N,)
    merged_in = torch.full((len(g),), math.nan)  # (N,) the round a token was merged away, 0 if kept
    rounds = {}
    for p, (name, k) in enumerate(zip(g.names, budgets)):
        members = g.members(p)
        if name == "newline":
            kept = spread(g, p, k)
            groups[kept] = kept
            continue
        owner, when = bipartite_rounds(keys[members], k)
        if k:
            groups[members] = members[owner]
            merged_in[members] = when.float()
        rounds[name] = int(when.max()) if len(when) else 0
    keep = (groups == torch.arange(len(g))).nonzero()[:, 0]  # (K,) sorted
    return Selection(
        keep=keep,
        groups=groups,
        weights=mean_of_group(groups, keep),
        budgets=dict(zip(g.names, budgets)),
        maps={"merge round": merged_in},
        stats={"merge rounds": rounds},
    )


def bipartite_rounds(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching on n tokens (rows of `keys`, in raster order) until k are left.
    Returns (n,) the token (index into the n) each one ends up in, and (n,) the round in which each
    was merged away (0: never). k = 0 leaves nothing: every token is dropped."""
    n = len(keys)
    owner, when = torch.arange(n), torch.zeros(n, dtype=torch.long)
    if k == 0:
        return owner, when
    metric = keys.clone()  # (n, d) the sum of the keys each token holds
    alive, round_ = torch.arange(n), 0
    while len(alive) > k:
        round_ += 1
        r = min(len(alive) - k, (len(alive) + 1) // 2)  # at most the A side
        src, dst = (alive[i] for i in bipartite_match(metric[alive], r))
        metric.index_add_(0, dst, metric[src])
        remap = torch.arange(n)
        remap[src] = dst
        owner = remap[owner]
        when[src] = round_
        alive = alive[~torch.isin(alive, src)]
    return owner, when


def bipartite_match(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching on the rows of `metric` (M, d), dealt alternately into A
    and B in their order: the r A rows most similar (cosine) to their best B row, and that row.
    Returns (src, dst), (r,) each, indices into the M; r is at most the A side, ceil(M / 2)."""
    a = torch.arange(0, len(metric), 2, device=metric.device)
    b = torch.arange(1, len(metric), 2, device=metric.device)
    similarity = F.normalize(metric[a], dim=-1) @ F.normalize(metric[b], dim=-1).T  # (|A|, |B|)
    best, partner = similarity.max(1)  # (|A|,) each A row's most similar B row
    chosen = torch.argsort(best, descending=True, stable=True)[:r]  # the r best-matched A rows
    return a[chosen], b[partner[chosen]]


def mean_of_group(groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(K, N) sparse weights: each kept token carries the mean of every token in its group, itself included."""
    members = (groups >= 0).nonzero()[:, 0]  # (M,)
    size = torch.bincount(groups[members], minlength=len(groups))  # (N,)
    rows = torch.searchsorted(keep, groups[members])
    values = 1.0 / size[groups[members]].float()
    return torch.sparse_coo_tensor(
        torch.stack([rows, members]), values, (len(keep), len(groups)), check_invariants=True
    ).coalesce()
