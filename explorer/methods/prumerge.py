"""PruMerge+ (Shang, Cai, Xu, Lee and Yan, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient
Large Multimodal Models", ICCV 2025, arXiv 2403.15388, github.com/42Shawn/LLaVA-PruMerge).

In every partition, with the [CLS] attention of the last encoder layer computed as the code does (one
head over all channels) and that layer's keys (heads joined):
1. outliers: the n tokens whose attention lies above Q3 + 1.5 * IQR of the partition's attention;
2. PruMerge+'s spatial tokens: every (floor(M / n) // 3)-th token of the partition's M, in raster
   order, that is not an outlier already;
3. each kept token absorbs its `neighbours` most key-similar dropped tokens, weighted by their
   attention, unnormalised: it reaches the LLM as the projection of x_k + sum_j attention_j * x_j,
   x = encoder outputs of the feature layer (`Selection.weights`).
`adaptive=True` keeps what steps 1-2 find, as many as that is (labelled adaptive, no budget). The
default fixed-budget mode splits the budget over the partitions in proportion to their sizes and
keeps, in each, the top (1 - spatial) of its share by attention and spreads the rest evenly over the
tokens left (the adaptive rule adds about three spatial tokens per outlier, so spatial = 0.75).
Newline tokens are dropped; the fixed-budget mode gives them only what the other partitions cannot
hold, so a budget of N keeps everything.

Differs from the paper: the fixed-budget mode is ours (the paper's count is adaptive), its
proportions taken from the adaptive rule; a kept token absorbs only dropped tokens, where the code lets it absorb kept
ones too (so nothing changes when nothing is dropped); no extra token summing all dropped tokens is
appended (it has no place on the image and would cost a budget token per partition); a partition
with no outlier still keeps its top token, where the code would divide by zero.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives in the last layer, with the heads joined into one and averaged over the queries,
gives the outliers instead, as community ports do; a token that folds several patches gets their
mean (see `explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import CLS_ONEHEAD_LAST, HIDDEN_FEATURE, KEYS_LAST, Method, Selection, Signals, fraction_of
from .common import merge_weights, patches_first, spread, top


@dataclass(frozen=True)
class PruMergePlus(Method):
    adaptive: bool = field(
        default=False, metadata={"help": "keep the attention outliers and spatial tokens, as many as they are"}
    )
    spatial: float = field(
        default=0.75,
        metadata={"help": "fixed-budget mode: share of each partition's tokens spread evenly", "range": (0.0, 1.0)},
    )
    neighbours: int = field(
        default=32,
        metadata={"help": "dropped tokens each kept token absorbs, most key-similar first", "range": (0, 4096)},
    )

    needs: ClassVar[tuple[str, ...]] = (CLS_ONEHEAD_LAST, KEYS_LAST, HIDDEN_FEATURE)
    summary: ClassVar[str] = "PruMerge+: [CLS] attention outliers + spatial tokens, each absorbing similar dropped ones"

    def select(self, s: Signals) -> Selection:
        g, attention = s.geometry, s[CLS_ONEHEAD_LAST]
        keys = F.normalize(s[KEYS_LAST].flatten(1), dim=-1)  # (N, D), heads joined
        budgets = None if self.adaptive else patches_first(g, s.budget)
        groups = torch.full((len(g),), -1)  # (N,)
        nothing = torch.empty(0, dtype=torch.long)
        kept, into, sources, outliers, spaced = [], [nothing], [nothing], {}, {}
        for p, name in enumerate(g.names):
            if name == "newline":
                kept.append(spread(g, p, 0 if budgets is None else budgets[p]))
                continue
            members = g.members(p)
            chosen, extra = self.pick(attention, members, None if budgets is None else budgets[p])
            outliers[name], spaced[name] = len(chosen), len(extra)
            mine = torch.cat([chosen, extra]).sort().values  # (K_p,)
            dropped = members[~torch.isin(members, mine)]  # (M - K_p,)
            kept.append(mine)
            if min(self.neighbours, len(dropped), len(mine)) > 0:
                nearest, owner = absorb(keys, mine, dropped, min(self.neighbours, len(dropped)))  # (K_p, m)
                into.append(mine.repeat_interleave(nearest.shape[1]))
                sources.append(nearest.flatten())
                groups[dropped[owner >= 0]] = mine[owner[owner >= 0]]
        keep = torch.cat(kept).sort().values  # (K,)
        groups[keep] = keep
        into, sources = torch.cat(into), torch.cat(sources)
        weights = merge_weights(keep, len(g), into, sources, attention[sources])  # x_k + sum_j attention_j * x_j
        return Selection(
            keep=keep,
            scores=attention,
            groups=groups,
            weights=weights,
            budgets={} if budgets is None else dict(zip(g.names, budgets)),
            stats={"outliers": outliers, "spatial": spaced},
        )

    def pick(self, attention: torch.Tensor, members: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A partition's tokens by attention and its evenly spaced ones: k in all, or the adaptive rule's
        count when k is None."""
        if len(members) == 0:
            return members, members
        if k is None:
            chosen = top(attention, members, max(1, outlier_count(attention[members])))
            spaced = members[torch.arange(0, len(members) - 1, max(1, len(members) // len(chosen) // 3))]
            return chosen, spaced[~torch.isin(spaced, chosen)]
        chosen = top(attention, members, k - fraction_of(self.spatial, k))
        rest = members[~torch.isin(members, chosen)]  # (M - n,) in raster order
        n = k - len(chosen)
        return chosen, rest[torch.arange(n) * len(rest) // max(1, n)]


def outlier_count(attention: torch.Tensor) -> int:
    """How many values lie above Q3 + 1.5 * IQR (quartiles interpolated linearly, as numpy's)."""
    q1, q3 = torch.quantile(attention.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return int((attention.double() > q3 + 1.5 * (q3 - q1)).sum())


def absorb(keys: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m dropped tokens most key-similar to each kept token, (K, m); and for each dropped token
    the position in `kept` of the most similar kept token that took it, -1 if none did, (D,)."""
    similarity = keys[kept.to(keys.device)] @ keys[dropped.to(keys.device)].T  # (K, D)
    nearest = similarity.topk(m, dim=1).indices  # (K, m)
    taken = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, nearest, True)
    owner = torch.where(taken.any(0), similarity.masked_fill(~taken, -torch.inf).argmax(0), -1)  # (D,)
    return dropped[nearest.cpu()], owner.cpu()
