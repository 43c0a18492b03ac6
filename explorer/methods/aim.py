"""AIM (Zhong, Liu, Li and Wang, "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and
Pruning", ICCV 2025, arXiv 2412.03248, github.com/LaVi-Lab/AIM).

AIM reduces twice, with one knob each, so that one model serves any compute budget. Before the LLM,
iterative token merging: the projected visual tokens are dealt alternately into two sides, each token
of one side finds its most cosine-similar token on the other, and the most alike pairs merge into
their mean, round after round (ToMe's bipartite soft matching, `tome`), until M tokens are left.
Inside the LLM, progressive pruning: the first layers see all M; from layer 14 on (of 28) each layer
rates the visual tokens by their multi-modal importance, a PageRank-like score read from its
attention (the attention sharpened by a temperature of 0.1, averaged over the queries, then the
root mean square over the heads), and keeps the top ones, fewer and fewer on a linear schedule until
layer 21. Text tokens are never pruned. Here one count b drives both: the LLM receives
M = N (b/N)^split tokens (split = 1/2: the geometric mean of N and b), and the linear schedule runs
from M down to b, left after layer 21. The budget B is the mean visual tokens over the LLM's layers:
b is the largest count for which, with M = N (b/N)^split entering, that mean is at most B, and once
the M tokens have entered, the last count is the largest that keeps it so: B = 192 of 576 on a
28-layer LLM merges to M = 238 and prunes to 221, 204, ..., 102 before layers 15 to 22 (a mean of
191.9). With `budget_after_cuts`, b = B. Kept tokens keep their original positions.

Differs from the paper: the paper merges to a fixed share (25% in its code) and prunes to no visual
token at all by layer 21; here the budget sets both counts. The merge works per partition
(thumbnail, each crop, as the paper merges per frame), newlines only getting what the other
partitions cannot hold, and a merged token is the mean of the feature layer's encoder outputs
of its members before the projector (`Selection.weights`), where the paper averages projected
tokens; merged tokens keep their place in LLM order (the code moves them after the unmerged ones).
The importance is one step of the PageRank iteration (the paper runs 5 over the whole attention
matrix, every token a query): the hooks read the attention rows of the prompt's text after the
image, so the text tokens are the queries, and the temperature is applied to their attention over
the visual tokens still there, renormalised over those. `start` and `stop` are numbered as in a
28-layer LLM (Qwen2-7B in LLaVA-OneVision-7B) and scaled to the model's depth; stages that fall on the
same layer merge, and no cut comes after the second-to-last layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import FEATURES, HIDDEN_FEATURE, LLM_ATTENTION, Cut, ExplorerError, Method, Selection, Signals
from .common import budget_after_cuts, top
from .tome import merge_by_partition

PAPER_DEPTH = 28  # the LLM the layer numbers are counted in


@dataclass(frozen=True)
class AIM(Method):
    split: float = field(
        default=0.5,
        metadata={
            "help": "share (log scale) of the reduction done by merging: the LLM gets N (B/N)^split",
            "range": (0.0, 1.0),
        },
    )
    start: int = field(
        default=14, metadata={"help": "first LLM layer that prunes, as in a 28-layer LLM", "range": (0, 200)}
    )
    stop: int = field(
        default=21,
        metadata={"help": "the layer whose pruning leaves the budget, as in a 28-layer LLM", "range": (0, 200)},
    )
    temperature: float = field(
        default=0.1, metadata={"help": "sharpens the attention the importance is read from", "range": (0.01, 10.0)}
    )
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()

    stage: ClassVar[str] = "llm"
    vision_needs: ClassVar[tuple[str, ...]] = (FEATURES, HIDDEN_FEATURE)
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION,)
    summary: ClassVar[str] = (
        "AIM: merge alike projected tokens before the LLM, then prune by attention importance on a linear "
        "schedule over LLM layers 14-21 of 28"
    )

    def entering(self, n: int, budget: int) -> int:
        """M: the tokens merging leaves for the LLM, between the budget and N."""
        return min(n, max(budget, math.floor(n * (budget / n) ** self.split)))

    def select_vision(self, s: Signals) -> Selection:
        """Before the LLM: bipartite soft matching on the projected tokens, per partition, down to M."""
        merged = merge_by_partition(s.geometry, s[FEATURES], self.entering(len(s.geometry), s.budget))
        return dataclasses.replace(merged, maps={"merged before the LLM": merged.maps["merge round"]})

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        if self.start > self.stop:
            raise ExplorerError(f"aim: start ({self.start}) must not come after stop ({self.stop})")
        steps = self.stop - self.start + 1
        cuts = {}  # scoring layer -> tokens; a later step on the same layer replaces an earlier one
        for i, layer in enumerate(range(self.start, self.stop + 1), 1):
            scaled = min(layer * depth // PAPER_DEPTH, depth - 2)
            cuts[scaled] = n - (n - budget) * i // steps  # linear from n (before start) to the budget
        return [Cut(layer=layer + 1, score_layer=layer, tokens=k) for layer, k in cuts.items()]

    def select(self, s: Signals) -> Selection:
        scores = importance(s[LLM_ATTENTION], self.temperature)  # (N,) NaN for tokens cut before
        keep = top(scores, s.alive.nonzero()[:, 0], s.budget)
        return Selection(keep=keep.sort().values, scores=scores)


def importance(attention: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) multi-modal importance from attention (H, T, N) (NaN for tokens cut before): each text
    row's attention raised to 1 / temperature and renormalised over the visual tokens, averaged over
    the rows, then the root mean square over the heads."""
    logits = (attention.float().log() / temperature).nan_to_num(nan=-math.inf)  # (H, T, N), up to a row constant
    sharpened = torch.softmax(logits, dim=-1)  # a^(1/t) / sum a^(1/t) over the visual tokens
    scores = sharpened.mean(1).pow(2).mean(0).sqrt()  # (N,)
    return scores.masked_fill(attention[0, 0].isnan(), math.nan)
