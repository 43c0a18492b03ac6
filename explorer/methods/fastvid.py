"""FastVID (Shen, Gong, He, Zhang, Liu, Zhao and Ding, "FastVID: Dynamic Density Pruning for Fast Video
Large Language Models", NeurIPS 2025, arXiv 2503.11187, github.com/LunarShen/FastVID).

Before the LLM, on the projected tokens of a whole clip (a frame, or a temporal group of frames, is one
partition), as the official LLaVA-OneVision code does it (modeling_qwen2.py, L900-1075):
1. DySeg: the clip is cut into segments of consecutive frames, at the c - 1 least alike transitions
   between neighbouring frames and wherever two neighbours are less alike than tau (cosine similarity of
   the frames' global features);
2. STPrune, salient part: every frame keeps its most attended tokens, 1 - d of its share;
3. STPrune, context part: the other d of a segment's share become anchors, held by every p-th frame of
   the segment counting back from its last; an anchor frame picks its anchors among its non-salient
   tokens by DPC-kNN density score (distance to the nearest denser token times the density, density from
   the 4 nearest neighbours);
4. DTM: every non-salient token of the segment joins the most cosine-similar anchor of each anchor frame,
   and an anchor reaches the LLM as w * itself + (1 - w) * the mean of those that joined it (itself
   among them), w = max(1 / (joined + 1), beta) (`Selection.weights`, mixing the projected features).
Tokens outside frames (OneVision's newline after the last frame) are kept, as the code keeps them.

The budget B is met exactly: the tokens outside frames first, the rest split evenly over the frames
(the earlier frames get the remainder), each frame's share s as the code splits it, s - floor(d * s)
salient; a segment's context tokens are split evenly over its anchor frames, the later ones getting the
remainder. The code keeps int(r * T) of a frame's T tokens, so its count is not floor(r * N), and it
drops the remainder of a segment's context count that its anchor frames cannot share evenly; where
the counts agree, the kept tokens and the merges are the code's (tests/test_fastvid.py).

Differs from the paper: the frames' global features are the mean of each frame's projected tokens (as
the official Qwen2.5-VL port takes them), and the salient tokens' attention is the attention each token
receives at the feature layer (mean over heads and queries, the "cls@feature" signal), where the
LLaVA-OneVision code runs the SigLIP checkpoint's attention-pooling head, which llava-hf's OneVision
drops, on the feature layer for both; density ties are broken by index, not by the code's 1e-6 noise; an
anchor frame that cannot hold its context share hands the rest to the segment's other anchor frames and
then to its other frames as salient tokens, where the code would fail (only above about r = 0.45 with
the defaults); p is at least 2 (the code's p = 1 merges each frame on its own); kept tokens stay in LLM
order at their own places, as in the code. On Qwen2-VL (a temporal group of 2 frames is a frame here) it
follows the OneVision code, where the official Qwen2.5-VL port splits each segment's salient and anchor
counts its own way. A token that joined anchors of several anchor frames is drawn in the group of the
one most like it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import CLS_FEATURE, FEATURES, Method, Selection, Signals
from .common import Entries, allocate, dpc_knn, sparse_rows, top


@dataclass(frozen=True)
class FastVID(Method):
    segments: int = field(
        default=8,
        metadata={"help": "DySeg's c: cut the clip at its c - 1 least alike frame transitions", "range": (1, 64)},
    )
    threshold: float = field(
        default=0.9,
        metadata={
            "help": "DySeg's tau: also cut where neighbouring frames are less alike than this",
            "range": (-1.0, 1.0),
        },
    )
    context: float = field(
        default=0.4,
        metadata={
            "help": "STPrune's d: the share of each frame's tokens spent on density anchors",
            "range": (0.0, 1.0),
        },
    )
    step: int = field(
        default=4,
        metadata={"help": "DTM's p: every p-th frame of a segment, from its last, holds the anchors", "range": (2, 64)},
    )
    beta: float = field(
        default=0.6,
        metadata={"help": "DTM's beta: the least weight an anchor keeps of itself in its merge", "range": (0.0, 1.0)},
    )

    needs: ClassVar[tuple[str, ...]] = (FEATURES, CLS_FEATURE)
    requires: ClassVar[tuple[str, ...]] = ("clip",)
    on_clips: ClassVar[str] = "clip"
    summary: ClassVar[str] = (
        "FastVID: video cut into segments of alike frames; each frame keeps its most attended tokens, "
        "density anchors per segment merge the rest"
    )

    def select(self, s: Signals) -> Selection:
        g, frames = s.geometry, s.geometry.frames
        features = s[FEATURES].float().cpu()  # (N, D)
        attention = s[CLS_FEATURE].float().cpu()  # (N,)
        outside = g.outside_frames()[: s.budget]  # kept, as the code keeps the newline
        shares = allocate(s.budget - len(outside), [1] * len(frames), [len(g.members(p)) for p in frames])
        segments = dyseg([features[g.members(p)].mean(0) for p in frames], self.segments, self.threshold)
        n = len(g)
        groups, segment_of = torch.full((n,), -1), torch.full((n,), torch.nan)
        density, best = torch.full((n,), torch.nan), torch.full((n,), -2.0)  # best: similarity to its anchor
        weights, held = [], []  # (3, E) merge entries per anchor frame (see `dtm_weights`); the anchors
        groups[outside] = outside
        for number, segment in enumerate(segments):
            members = [g.members(frames[f]) for f in segment]
            salient, anchors = self.counts([shares[f] for f in segment], [len(m) for m in members])
            rest = []  # the segment's non-salient tokens
            for tokens, k in zip(members, salient):
                picked = top(attention, tokens, k)
                groups[picked] = picked
                rest.append(tokens[~torch.isin(tokens, picked)])
                segment_of[tokens] = number
            pool = torch.cat(rest)
            for tokens, k in zip(rest, anchors):
                if k == 0:
                    continue
                score = dpc_knn(features[tokens], 4)  # (M,)
                density[tokens] = score
                chosen = tokens[torch.argsort(score, descending=True, stable=True)[:k]]
                similarity = F.normalize(features[pool], dim=-1) @ F.normalize(features[chosen], dim=-1).T
                near, owner = similarity.max(1)  # (P,) each non-salient token's most similar anchor
                closer = near > best[pool]
                groups[pool[closer]], best[pool[closer]] = chosen[owner[closer]], near[closer]
                weights.append(dtm_weights(chosen, pool, owner, self.beta))
                held.append(chosen)
        anchors = torch.cat(held + [outside])
        groups[anchors] = anchors  # an anchor holds itself, even where it is the twin of an earlier one
        keep = (groups == torch.arange(n)).nonzero()[:, 0]  # (K,) sorted
        return Selection(
            keep=keep,
            scores=attention,
            groups=groups,
            weights=sparse_rows(weights, keep, n),
            mixes="features",
            budgets={name: int((g.partition[keep] == p).sum()) for p, name in enumerate(g.names)},
            maps={"DySeg segment": segment_of, "density score": density},
            stats={
                "segments": {f"segment {i}": len(segment) for i, segment in enumerate(segments)},
                "segment": {g.names[frames[f]]: i for i, segment in enumerate(segments) for f in segment},
            },
        )

    def counts(self, shares: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        """(salient, anchors) per frame of a segment: each frame's share s less floor(d * s) salient, and
        the segment's context tokens split over every p-th frame from its last, each at most what its
        frame has left; what they cannot hold goes to the segment's frames as salient tokens."""
        salient = [s - int(s * self.context) for s in shares]
        context = sum(shares) - sum(salient)
        holders = [i for i in range(len(shares)) if (len(shares) - 1 - i) % self.step == 0]
        room = [sizes[i] - salient[i] if i in holders else 0 for i in range(len(shares))]
        anchors = allocate(context, [int(i in holders) for i in range(len(shares))][::-1], room[::-1])[::-1]
        left = [n - s - a for n, s, a in zip(sizes, salient, anchors)]
        extra = allocate(context - sum(anchors), [1] * len(shares), left)
        return [s + e for s, e in zip(salient, extra)], anchors


def dyseg(global_features: list[torch.Tensor], c: int, tau: float) -> list[list[int]]:
    """DySeg: the frames (indices) of each segment, cut after the c - 1 least alike transitions and
    after every transition less alike than tau (cosine similarity of neighbouring global features)."""
    unit = F.normalize(torch.stack(global_features), dim=-1)  # (F, D)
    similarity = (unit[:-1] * unit[1:]).sum(1)  # (F - 1,)
    order = torch.argsort(similarity, stable=True)[: max(c - 1, 0)]
    cuts = sorted(set(order.tolist()) | set((similarity < tau).nonzero()[:, 0].tolist()))
    bounds = [-1, *cuts, len(unit) - 1]
    return [list(range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]


def dtm_weights(anchors: torch.Tensor, pool: torch.Tensor, owner: torch.Tensor, beta: float) -> Entries:
    """DTM: each anchor carries w of itself plus (1 - w) / J of each of the J tokens of `pool` that joined
    it (itself too; `owner` (P,): the anchor each joined), w = max(1 / (J + 1), beta)."""
    joined = torch.bincount(owner, minlength=len(anchors)).float()  # (A,)
    w = (1 / (joined + 1)).clamp(min=beta)  # (A,)
    values = torch.cat([w, ((1 - w) / joined.clamp(min=1))[owner]])
    return Entries(torch.cat([anchors, anchors[owner]]), torch.cat([anchors, pool]), values)
