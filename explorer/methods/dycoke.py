"""DyCoke (Tao, Qin, You, Sui and Wang, "DyCoke: Dynamic Compression of Tokens for Fast Video Large
Language Models", CVPR 2025, arXiv 2411.15024, github.com/KD-TAO/DyCoke).

DyCoke compresses a clip twice. Before the LLM, temporal token merging (TTM) works on windows of 4
frames (partitions: a frame, or a temporal group of frames on Qwen2-VL), on the projected features the
LLM receives: each pair's second frame keeps only its tokens least alike (cosine similarity, token
against the token at the same cell) to the pair's first frame, and each window's third frame keeps its
tokens least alike to the window's first frame; the others stay whole. Inside the LLM, at every decode
step, the new token's attention at layer `layer` - 1 (heads averaged) over the visual tokens is
compared with the step before's (cosine similarity); where they differ (below `threshold`, and at the
first step), the layers from `layer` on attend in this step to the visual tokens that attention ranks
highest, 1 - `pruning` of them, and to the whole text and answer; where they are alike, to every
token. The KV caches keep every token, so a token left out at one step may come back at the next.

The budget B is what TTM keeps: the visual tokens the prefill gives the LLM (the layer mean too, since
no layer of the prefill drops any), as the video papers that compare with DyCoke at a retention ratio
count it. The official code keeps int((1 - k) 196) tokens of every compared frame (k = 0.7 for
LLaVA-OneVision in its lmms-eval model); here the compared frames share what B leaves after the whole
frames and the newline, as evenly as counts allow, so the count is exact. The decode stage keeps its
official defaults: layer 3, 80% pruned, threshold 0.9. Scores: each compared token's dissimilarity to
its reference (1 - similarity), NaN for the whole frames; maps: "similarity to reference" and "reference
frame".

Differs from the paper: the paper's TTM is described as merging, the official code (llava_arch.py,
dycole_ttm) drops, as done here. B sets the compared frames' share (the official code: its merging
ratio); below what the whole frames and the newline make (about 31% of a 16-frame clip, 28% of a
32-frame one), the compared frames keep nothing and each whole frame keeps its share of the rest at cells spread evenly over its
grid (the paper never goes there). Kept tokens stay in the order of their cells, where the official
code puts a compared frame's tokens in the order of their similarity. A clip of an odd number of frames
keeps its last frame whole (the official code drops it). As in the official code, the last window of
4 frames compares only its pairs (its loop stops a window early), the decode stage ranks every visual
token but LLaVA-OneVision's newline and the last frame token (its image_token_length is one short),
which always stay, keeps int(R (1 - pruning)) of the R ranked, and a step whose attention is within `threshold` of
the step before's attends to every token. Its attention is recomputed from the layer's queries and
keys, as the official code computes it; the step before is this answer's (the official code carries it
across samples). The layer is clamped to the LLM's last (for an LLM of 3 layers or fewer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURES, LLM_ATTENTION, Cut, Method, Selection, Signals
from .common import spread


@dataclass(frozen=True)
class DyCoke(Method):
    summary: ClassVar[str] = (
        "video: drops tokens alike the same cell of an earlier frame before the LLM, then attends, at each "
        "decode step, to the visual tokens its attention ranks highest"
    )
    stage: ClassVar[str] = "llm"
    on_clips: ClassVar[str] = "clip"
    requires: ClassVar[tuple[str, ...]] = ("clip",)
    vision_needs: ClassVar[tuple[str, ...]] = (FEATURES,)
    decode_pruning: bool = field(
        default=True,
        metadata={"help": "decode stage: at each decode step, attend only to the visual tokens ranked highest"},
    )
    layer: int = field(
        default=3,
        metadata={
            "help": "decode stage: the first LLM layer that attends to fewer tokens (ranked at the one before)",
            "range": (1, 80),
        },
    )
    pruning: float = field(
        default=0.8,
        metadata={
            "help": "decode stage: the share of the ranked visual tokens a decode step leaves out",
            "range": (0.0, 0.99),
        },
    )
    threshold: float = field(
        default=0.9,
        metadata={
            "help": "decode stage: a step whose attention is at least this alike the step before's "
            "(cosine) attends to every token",
            "range": (0.0, 1.0),
        },
    )

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        """No cut in the prefill (this one keeps every token): it marks where the decode stage acts."""
        layer = min(self.layer, depth - 1)
        return [Cut(layer=layer, score_layer=layer - 1, tokens=budget)]

    def entering(self, n: int, budget: int) -> int:
        return budget  # TTM keeps B, the prefill's cut all of them

    def select(self, s: Signals) -> Selection:
        """The prefill's cut keeps every token; its scores are TTM's, for the heatmap."""
        return Selection(keep=s.alive.nonzero()[:, 0], scores=1 - s["similarity to reference"])

    def select_vision(self, s: Signals) -> Selection:
        """TTM: each compared frame keeps its share of B, its tokens least alike their reference's."""
        g, n = s.geometry, len(s.geometry)
        frames = g.frames
        members = g.frame_grid()  # (F, M)
        features = s[FEATURES].float().cpu()  # (N, D)
        similarity = torch.full((n,), torch.nan)
        reference = torch.full((n,), torch.nan)
        compared = references(len(frames))
        for f, r in compared.items():
            a, b = features[members[f]], features[members[r]]  # (M, D)
            if f == r + 1:  # a pair, on features normalised first as the official code does
                a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            similarity[members[f]] = F.cosine_similarity(a, b, dim=1)
            reference[members[f]] = float(r)
        counts = shares(len(frames), members.shape[1], s.budget - (n - members.numel()))
        keep = [g.outside_frames()[: s.budget]]  # the newline after the frames
        for f, count in enumerate(counts):
            if f in compared:
                keep.append(members[f][similarity[members[f]].topk(count, largest=False).indices])
            elif count == members.shape[1]:
                keep.append(members[f])
            elif count:
                keep.append(spread(g, frames[f], count))
        budgets = {g.names[p]: count for p, count in zip(frames, counts)}
        maps = {"similarity to reference": similarity, "reference frame": reference}
        windows = {"segment": {g.names[p]: f // 4 for f, p in enumerate(frames)}}  # the official windows of 4
        return Selection(
            keep=torch.cat(keep).sort().values, scores=1 - similarity, budgets=budgets, maps=maps, stats=windows
        )

    @property
    def decode_keep(self):
        """The decode stage, when it is on."""
        return self.attended if self.decode_pruning else None

    def attended(self, s: Signals, previous: Signals | None) -> torch.Tensor | None:
        """The visual tokens this decode step's layers from `layer` on attend to; None: every one."""
        g = s.geometry
        framed = torch.isin(g.partition, torch.tensor(g.frames)).to(s.alive.device)
        ranked = (s.alive & framed).nonzero()[:, 0][:-1]  # (R,) the official code's is one short
        attention = s[LLM_ATTENTION].mean(0)[0]  # (N,) heads averaged
        if previous is not None:
            before = previous[LLM_ATTENTION].mean(0)[0]
            if F.cosine_similarity(attention[ranked], before[ranked], dim=0) >= self.threshold:
                return None
        count = int(len(ranked) * (1 - self.pruning))  # as the official code rounds
        top = ranked[attention[ranked].topk(count).indices]
        rest = s.alive.clone()
        rest[ranked] = False
        return torch.cat([top, rest.nonzero()[:, 0]]).sort().values


def references(frames: int) -> dict[int, int]:
    """Each compared frame's reference, by the official code's two loops: in each pair (0, 1), (2, 3), ...
    the second against the first; in each window of 4 but the last, the third against the first."""
    pairs = {i + 1: i for i in range(0, frames - 1, 2)}
    return pairs | {i + 2: i for i in range(0, frames - 4, 4)}


def shares(frames: int, size: int, budget: int) -> list[int]:
    """Each frame's count when `frames` frames of `size` tokens share `budget`: the whole frames stay
    whole and the compared ones share the rest evenly (the first ones one more), or, when the whole
    frames do not fit, the compared ones keep nothing and the whole ones share the budget evenly."""
    compared = references(frames)
    whole = [f for f in range(frames) if f not in compared]
    rest = budget - size * len(whole)
    split, among = (rest, sorted(compared)) if rest >= 0 else (max(budget, 0), whole)
    each, extra = divmod(split, len(among)) if among else (0, 0)
    counts = [size if rest >= 0 else 0] * frames
    for i, f in enumerate(among):
        counts[f] = each + (i < extra)
    return counts
