"""SparseVLM (Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer and Zhang,
"SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025,
arXiv 2410.04417, github.com/Gumpest/SparseVLMs), as its v2.0 code runs (USE_VERSION=2_0).

Text raters: in the LLM's input embeddings V (visual) and T (text after the image), the text tokens
whose share of softmax_text(V T^T), averaged over the visual tokens, is above the mean. At layers 2,
6 and 15 the raters' attention to the visual tokens is read, divided (`rope_correction`, v2.0's
"gravity correction", llava/model/language_model/modelling_sparse_llama.py L242-251) by the logits
RoPE alone gives, q.k / sqrt(head_dim) for all-ones queries and keys at the tokens' positions, which
lifts the tokens far from the text. The `heads` heads that give the visual tokens the most of it are
averaged, then the raters, and only the top tokens go on. Kept tokens keep their original positions;
dropped tokens are not recycled (as in v2.0).

The budget B is the paper's: the mean visual tokens over the LLM's layers, which the code counts as
(2 N + 4 c1 + 9 c2 + 17 c3) / 32 for its stage counts c1, c2, c3 (L359, L368). The official schedules
(score.py L11-14) are kept exactly at the paper's budgets on a 32-layer LLM: 192 of 576 keeps
300/200/118 (that count: 192.4), 128 keeps 238/108/60, 96 keeps 246/54/28 and 64 keeps 66/34/20; on
N tokens each count c becomes floor(c N / 576). Between them the two schedules around B (counted in
576ths) are interpolated linearly (above 192 toward no cut at all, below 64 the shape of the 64
schedule), scaled so that the layer mean is B, and rounded to whole tokens that keep it B exactly
where whole counts can (always on 32 layers): B = 160 of 576 keeps 265/155/89, a mean of exactly 160.
With `budget_after_cuts` B is the last count instead: the schedule whose last count is nearest B (in
576ths) is rescaled so that the last stage keeps B (118, 60, 28 and 20 of 576 give the official
schedules). B = 160 keeps 406/271/160 then.

Differs from the paper: the code runs each rating layer on the whole sequence and cuts its output, and
counts the layer with the tokens it leaves; here the rating layer's attention is read from its own
queries and keys on the whole sequence and the tokens are cut before it runs, so each layer computes
with the tokens the code counts it with (the kept set is the same). `layers` are numbered as in a
32-layer LLM (LLaVA-7B) and scaled to the model's depth, layer l becoming the nearest whole layer to
l depth / 32 (at least 1); stages that fall on the same layer merge. The code computes in fp16, ranks
with torch.topk and keeps at most one token fewer than it has (score.py L41); here all is fp32, ties
go to the lower index, and a stage may keep every token. The correction's RoPE logits turn negative
for tokens about 1700 positions apart (head_dim 128, RoPE base 10000), which the code's 576 tokens
never reach but LLaVA-NeXT's can.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch

from ..core import LLM_ATTENTION, LLM_EMBEDS, LLM_ROPE, Cut, ExplorerError, Method, Selection, Signals, text_of
from .common import budget_after_cuts, top

PAPER_N, PAPER_DEPTH = 576, 32  # LLaVA-1.5's visual tokens and LLM layers, which the schedules are counted in
PAPER = {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}  # v2.0, score.py L11-14
KNOTS = sorted([*PAPER.items(), (PAPER_N, (PAPER_N,) * 3)])  # budget (of 576) -> stage counts, interpolated


@dataclass(frozen=True)
class SparseVLM(Method):
    layers: str = field(default="2,6,15", metadata={"help": "rating layers, numbered as in a 32-layer LLM"})
    heads: int = field(
        default=14, metadata={"help": "attention heads averaged (those that see the image most)", "range": (1, 128)}
    )
    rope_correction: bool = field(
        default=True,
        metadata={"help": "v2.0: divide the attention by the logits RoPE alone gives (all-ones queries and keys)"},
    )
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION, LLM_EMBEDS, LLM_ROPE)
    summary: ClassVar[str] = "SparseVLM: at LLM layers 2, 6, 15, keep the tokens that text raters attend to most"

    def rating_layers(self, depth: int) -> list[int]:
        """The rating layers as given, numbered as in a 32-layer LLM."""
        try:
            layers = [int(layer) for layer in self.layers.split(",")]
        except ValueError:
            layers = []
        if not 1 <= len(layers) <= 3 or layers != sorted(set(layers)) or layers[0] < 1:
            raise ExplorerError(
                f"sparsevlm: layers must be 1 to 3 rising layer numbers from 1, like 2,6,15; got {self.layers!r}"
            )
        return layers

    def staged(self, depth: int, counts) -> list[Cut]:
        """Cuts before the rating layers scaled to `depth`, each scored there, leaving `counts`; a later
        stage on the same layer replaces an earlier one."""
        scaled = [
            min(depth - 1, max(1, math.floor(layer * depth / PAPER_DEPTH + 0.5))) for layer in self.rating_layers(depth)
        ]
        cuts = dict(zip(scaled, counts))
        return [Cut(layer=layer, score_layer=layer, tokens=k) for layer, k in cuts.items()]

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        stages = len(self.rating_layers(depth))
        schedule = min(PAPER.values(), key=lambda counts: abs(counts[-1] / PAPER_N - budget / n))[-stages:]
        return self.staged(depth, [min(n, budget * count // schedule[-1]) for count in schedule])

    def mean_cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        stages = len(self.rating_layers(depth))
        paper = Fraction(budget * PAPER_N, n)  # the budget in 576ths
        if depth == PAPER_DEPTH and self.layers == "2,6,15" and paper in PAPER:
            return self.staged(depth, [count * n // PAPER_N for count in PAPER[paper]])
        shape = self.staged(depth, interpolated(paper)[-stages:])  # only the last stage of a merged layer stays
        layers = [c.layer for c in shape]
        weights = [b - a for a, b in zip(layers, [*layers[1:], depth])]  # layers each count is seen by
        target = depth * budget - layers[0] * n  # the weighted sum of the counts for a layer mean of B
        if target < sum(weights):
            raise ExplorerError(
                f"sparsevlm: a budget of {budget} visual tokens per LLM layer on average is less than its cuts can "
                f"reach: its first {layers[0]} layers see all {n}, so even 1 token after each cut averages "
                f"{(layers[0] * n + sum(weights)) / depth:.1f}; raise the budget, or set budget_after_cuts=true"
            )
        counts = whole(scaled(shape, weights, target, n), weights, target, n)
        return [Cut(layer=layer, score_layer=layer, tokens=k) for layer, k in zip(layers, counts)]

    def select(self, s: Signals) -> Selection:
        visual, text = s[LLM_EMBEDS].float(), s[text_of(LLM_EMBEDS)].float()  # (N, D), (T, D) before any cut
        relevance = torch.softmax(visual @ text.T, dim=1).mean(0)  # (T,)
        raters = relevance > relevance.mean()
        raters = raters if raters.any() else torch.ones_like(raters)
        attention = s[LLM_ATTENTION].float()  # (H, T, N), NaN columns for tokens cut before
        if self.rope_correction:
            attention = attention / s[LLM_ROPE].float()  # (T, N) the same for every head
        attention = attention[:, raters]  # (H, R, N)
        heads = attention.nansum((1, 2)).argsort(descending=True, stable=True)[: self.heads]
        scores = attention[heads].mean((0, 1))  # (N,)
        keep = top(scores, s.alive.nonzero()[:, 0], s.budget)
        return Selection(keep=keep.sort().values, scores=scores)


def interpolated(paper: Fraction) -> list[Fraction]:
    """The stage counts (of 576) for a budget of `paper` 576ths, linear between the official schedules."""
    if paper <= KNOTS[0][0]:
        return [Fraction(c) for c in KNOTS[0][1]]
    for (low, a), (high, b) in itertools.pairwise(KNOTS):
        if paper <= high:
            t = (paper - low) / (high - low)
            return [x + (y - x) * t for x, y in zip(a, b)]
    return [Fraction(PAPER_N)] * 3


def scaled(shape: list[Cut], weights: list[int], target: int, n: int) -> list[Fraction]:
    """The counts of `shape` scaled so that their sum weighted by `weights` is `target`, those that would
    pass n held at n and the others scaled again."""
    counts, held = [Fraction(c.tokens) for c in shape], [False] * len(shape)
    while True:
        free = sum(w * c for w, c, h in zip(weights, counts, held) if not h)
        rest = target - sum(w * n for w, h in zip(weights, held) if h)
        counts = [Fraction(n) if h else c * rest / free for c, h in zip(counts, held)]
        if all(c <= n for c in counts):
            return counts
        held = [h or c > n for c, h in zip(counts, held)]


def whole(ideal: list[Fraction], weights: list[int], target: int, n: int) -> list[int]:
    """Whole counts near `ideal`, falling, in 1..n, whose sum weighted by `weights` is `target` where
    whole counts can make it, else the largest below it; the nearest to `ideal` among those. The counts
    but the last are tried within the last weight of their ideal (enough to reach every remainder), and
    the last is the largest that fits."""
    *first, last = weights
    around = [range(max(1, math.floor(x) - last), min(n, math.floor(x) + last) + 1) for x in ideal[:-1]]
    best, key = None, None
    for counts in itertools.product(*around):
        if any(a < b for a, b in itertools.pairwise(counts)):
            continue
        rest = target - sum(w * c for w, c in zip(first, counts))
        final = min(rest // last, n, *counts[-1:])
        if final < 1:
            continue
        chosen = [*counts, final]
        rank = (rest - final * last, sum(w * abs(c - x) for w, c, x in zip(weights, chosen, ideal)))
        if key is None or rank < key:
            best, key = chosen, rank
    return best
