"""MustDrop (Liu, Shi, Hong, Hu, Yin and Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient
Multimodal Large Language Model", arXiv 2411.10803, github.com/liuting20/MustDrop).

MustDrop asks at every stage of the model which visual tokens can go. Before the LLM: the image is
cut into 3x3 windows of tokens; a window whose tokens are all alike (the mean cosine similarity of
every pair, on the first vision layer's output, at least 0.8) becomes one token, the mean of the
nine; and the tokens the [CLS] token attends to most in the last vision layer (8% of them, a merged
token scored by its members' mean) form the key set, which no later stage may drop. Inside the LLM,
after layers 2, 6, 10 and 14, the prompt's text (after the image) rates each visual token twice from
that layer's attention, heads averaged: globally, the share of all the text's attention it gets, and
individually, the most any single text token gives it. A token goes only when both are low (its
share below the global threshold and its peak below the individual one) and it is not in the key
set. The thresholds make the count adaptive (`adaptive`: labelled so, no budget). In budget mode the
tokens are ranked by max(share / global threshold, peak / individual threshold), which is at least 1
exactly for the tokens the thresholds keep, and every cut keeps the key set and then the top of the
rest, the counts falling geometrically from what enters the LLM to b at the last cut; windows merge,
most alike first, only while at least b tokens remain. The budget B is the mean visual tokens over
the LLM's layers, and b the largest count whose cuts keep that mean at most B (before the LLM,
reckoned as if all N tokens entered; at the cuts, for the tokens that did): with 576 tokens entering
a 32-layer LLM, B = 192 keeps 360/225/140/88 after layers 2, 6, 10 and 14 (a mean of 191.4). With
`budget_after_cuts`, b = B. Kept tokens are renumbered.
Decoding (`compact_cache`): once the prefill is over, the KV caches of the layers from the first
scoring layer (2) to the last cut are cut down to the final kept set, so every layer from there on
attends, for each new token, to the text, the final kept visual tokens and the answer so far.

Differs from the paper: the windows are merged after the encoder (their similarity is read from the
first layer's output, the merge is the mean of the feature layer's outputs before the projector,
`Selection.weights`), where the paper merges after the first layer and runs the rest of the encoder
on the merged tokens; windows tile each partition (thumbnail, each crop) from its top-left corner and
a window cut by the partition's edge is never merged (the code asserts square grids); a merged token
stays at its window's last cell in LLM order (the code moves merged tokens first), and its key-set
score is its members' mean attention in the unmerged encoder; the key set is taken over all
partitions at once, without newlines. `layers` are numbered as in a 32-layer LLM and scaled to the
model's depth (layer l becomes floor(l depth / 32), at most depth - 2), stages on the same layer
merge; the budget mode and its schedule are ours. In the decode stage the cached keys are index-selected as they are, as the paper's code does:
each keeps the rotary position it was cached with (renumbered for its layer's cut group, or not), and
a new token takes, in each compacted layer, the position that layer's cut group gives it, so the
distances between tokens are those of the prefill. The caches are cut at the first decode step, not
at the end of the prefill, and the compacted layers are scaled to the model's depth like the cuts
(the paper's code hard-codes 32 layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import (
    CLS_LAST,
    HIDDEN_0,
    HIDDEN_FEATURE,
    LLM_ATTENTION,
    Cut,
    ExplorerError,
    Geometry,
    Method,
    Selection,
    Signals,
)
from .common import budget_after_cuts, top
from .tome import mean_of_group


@dataclass(frozen=True)
class MustDrop(Method):
    adaptive: bool = field(
        default=False,
        metadata={"help": "adaptive: keep what the similarity and attention thresholds keep, as many as that is"},
    )
    window: int = field(
        default=3, metadata={"help": "side of the windows of tokens merged when alike", "range": (2, 8)}
    )
    similarity: float = field(
        default=0.8,
        metadata={
            "help": "a window merges when the mean cosine similarity of its tokens is at least this",
            "range": (-1.0, 1.0),
        },
    )
    key_share: float = field(
        default=0.08,
        metadata={"help": "share of the tokens (after merging) in the key set, never dropped", "range": (0.0, 1.0)},
    )
    layers: str = field(
        default="2,6,10,14", metadata={"help": "LLM layers after which tokens drop, as in a 32-layer LLM"}
    )
    global_threshold: float = field(
        default=0.001,
        metadata={
            "help": "a token may drop when its share of the text's attention is below this",
            "range": (1e-6, 1.0),
        },
    )
    individual_threshold: float = field(
        default=0.001,
        metadata={"help": "... and no text token gives it more attention than this", "range": (1e-6, 1.0)},
    )
    keep_positions: bool = field(
        default=False, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()
    compact_cache: bool = field(
        default=True,
        metadata={
            "help": "after the prefill, cut the KV caches of the layers from the first drop on down to the final "
            "kept set (the paper's decode stage)"
        },
    )

    stage: ClassVar[str] = "llm"
    vision_needs: ClassVar[tuple[str, ...]] = (HIDDEN_0, CLS_LAST, HIDDEN_FEATURE)
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION,)
    summary: ClassVar[str] = (
        "MustDrop: merge alike 3x3 windows, fix a [CLS] key set, then drop by dual text attention after LLM "
        "layers 2, 6, 10, 14 (budget, or adaptive thresholds); decode on caches cut to the final set"
    )

    def select_vision(self, s: Signals) -> Selection:
        """Before the LLM: merge alike windows, choose the key set."""
        g, n = s.geometry, len(s.geometry)
        hidden, cls = s[HIDDEN_0].float().cpu(), s[CLS_LAST].float().cpu()  # (N, C), (N,)
        tiles = torch.cat([windows(g, p, self.window) for p, name in enumerate(g.names) if name != "newline"])
        similarity = window_similarity(hidden, tiles)  # (W,)
        alike = torch.argsort(similarity, descending=True, stable=True)
        alike = alike[similarity[alike] >= self.similarity]  # the windows that may merge, most alike first
        if not self.adaptive:  # merging stops before fewer than B tokens are left
            alike = alike[: (n - s.budget) // (self.window**2 - 1)]
        groups = torch.arange(n)  # (N,)
        for tile in tiles[alike]:
            groups[tile] = tile[-1]  # a window goes into its last cell
        keep = (groups == torch.arange(n)).nonzero()[:, 0]  # (K,) sorted

        size = torch.bincount(groups, minlength=n)  # (N,)
        score = torch.zeros(n).index_add_(0, groups, cls.nan_to_num()) / size.clamp(min=1)  # members' mean
        score[size == 0] = math.nan
        score[cls.isnan()] = math.nan  # newlines have no [CLS] attention
        patches = keep[~score[keep].isnan()]
        count = math.ceil(Fraction(str(self.key_share)) * len(patches))
        key = top(score, patches, count if self.adaptive else min(count, s.budget))
        in_key = torch.zeros(n)
        in_key[key] = 1.0
        window_map = torch.full((n,), math.nan)
        window_map[tiles.flatten()] = similarity.repeat_interleave(tiles.shape[1])
        return Selection(
            keep=keep,
            scores=score,
            groups=groups,
            weights=mean_of_group(groups, keep),
            maps={"window similarity": window_map, "key set": in_key},
            stats={"MustDrop before the LLM": {"windows merged": len(alike), "key set": len(key)}},
        )

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        try:
            layers = [int(layer) for layer in self.layers.split(",")]
        except ValueError:
            layers = []
        if not 1 <= len(layers) <= 8 or layers != sorted(set(layers)) or layers[0] < 0:
            raise ExplorerError(
                f"mustdrop: layers must be 1 to 8 rising layer numbers, like 2,6,10,14; got {self.layers!r}"
            )
        layers = sorted({min(layer * depth // 32, depth - 2) for layer in layers})  # scored there, cut after it
        stages = len(layers)
        counts = [
            n if self.adaptive else max(budget, math.floor(n * (budget / n) ** (i / stages)))
            for i in range(1, stages + 1)
        ]
        counts[-1] = n if self.adaptive else budget
        return [Cut(layer=layer + 1, score_layer=layer, tokens=k) for layer, k in zip(layers, counts)]

    def compact_from(self, cuts: list[Cut]) -> int | None:
        """The decode stage: from the first cut's scoring layer on (the paper's layer 2), the caches hold
        only what the last cut keeps; never layer 0's, from which the model reads the sequence's length."""
        return max(cuts[0].score_layer, 1) if self.compact_cache else None

    def select(self, s: Signals) -> Selection:
        attention = s[LLM_ATTENTION].float().mean(0)  # (T, N) heads averaged, NaN for tokens cut before
        total = attention.sum(0)  # (N,) global: all the text's attention to each token
        share = total / total.nansum()
        peak = attention.max(0).values  # (N,) individual: the most one text token gives it
        scores = torch.maximum(share / self.global_threshold, peak / self.individual_threshold)  # >= 1: kept
        alive = s.alive.nonzero()[:, 0]  # (M,)
        key = torch.zeros_like(s.alive)
        if "key set" in s.maps:
            key = (s["key set"].to(s.alive.device) > 0) & s.alive
        if self.adaptive:
            keep = alive[(scores[alive] >= 1) | key[alive]]
            keep = keep if len(keep) else top(scores, alive, 1)  # never an empty image
        else:
            fixed = top(scores, key.nonzero()[:, 0], s.budget)  # the whole key set, which the budget holds
            rest = alive[~key[alive]]
            keep = torch.cat([fixed, top(scores, rest, s.budget - len(fixed))])
        return Selection(keep=keep.sort().values, scores=scores, maps={"text attention share": share})


def windows(g: Geometry, p: int, w: int) -> torch.Tensor:
    """(W, w * w) the tokens (indices into N) of every full w x w window of partition p, windows tiling
    its grid from the top-left corner, each window's tokens in raster order."""
    members = g.members(p)  # (M,) in raster order
    rows, cols = g.grid(p)
    cells = g.cells[members] - g.cells[members].amin(0) if len(members) else g.cells[members]  # (M, 2)
    full = (cells[:, 0] < rows // w * w) & (cells[:, 1] < cols // w * w)
    r, c = cells[full, 0], cells[full, 1]
    order = torch.argsort(((r // w) * (cols // w) + c // w) * w * w + (r % w) * w + c % w)
    return members[full][order].view(-1, w * w)


def window_similarity(hidden: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """(W,) the mean cosine similarity of every pair of distinct tokens in each window; hidden (N, C),
    tiles (W, w * w)."""
    x = F.normalize(hidden[tiles], dim=-1)  # (W, w*w, C)
    pairs = x @ x.transpose(1, 2)  # (W, w*w, w*w)
    m = tiles.shape[1]
    return (pairs.sum((1, 2)) - pairs.diagonal(dim1=1, dim2=2).sum(1)) / (m * (m - 1))
