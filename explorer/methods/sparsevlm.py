"""SparseVLM (Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer and Zhang,
"SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025,
arXiv 2410.04417, github.com/Gumpest/SparseVLMs), with the selection of its v2.0 code.

Text raters: in the LLM's input embeddings V (visual) and T (text after the image), the text tokens
whose share of softmax_text(V T^T), averaged over the visual tokens, is above the mean. At layers 2,
6 and 15, the raters' attention to the visual tokens is read. The `heads` heads that give the visual
tokens the most attention are averaged, then the raters, and only the top tokens go on to the next
layer. The stage counts follow the code's schedule (of 576 tokens) for the paper budget nearest to
ours: 300/200/118 for 192, 238/108/60 for 128, 246/54/28 for 96, 66/34/20 for 64. The counts are
rescaled so that the last stage keeps exactly B. Kept tokens keep their original positions, and
dropped tokens are not recycled (as in v2.0).

Differs from the paper: `layers` are numbered as in a 32-layer LLM (LLaVA-7B) and scaled to the
model's depth (layer l becomes floor(l * depth / 32), so they are unchanged on 32 layers); stages that
fall on the same layer merge. v2.0's correction that divides the attention by a RoPE-only map is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import LLM_ATTENTION, LLM_EMBEDS, Cut, ExplorerError, Method, Selection, Signals, text_of
from .common import top

PAPER_N = 576  # LLaVA-1.5's visual tokens, which the schedules below are counted in
SCHEDULES = [[300, 200, 118], [238, 108, 60], [246, 54, 28], [66, 34, 20]]  # v2.0, for budgets 192, 128, 96, 64


@dataclass(frozen=True)
class SparseVLM(Method):
    layers: str = field(default="2,6,15", metadata={"help": "rating layers, numbered as in a 32-layer LLM"})
    heads: int = field(
        default=14, metadata={"help": "attention heads averaged (those that see the image most)", "range": (1, 128)}
    )
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION, LLM_EMBEDS)
    summary: ClassVar[str] = "SparseVLM: at LLM layers 2, 6, 15, keep the tokens that text raters attend to most"

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        try:
            layers = [int(layer) for layer in self.layers.split(",")]
        except ValueError:
            layers = []
        if not 1 <= len(layers) <= 3 or layers != sorted(set(layers)):
            raise ExplorerError(
                f"sparsevlm: layers must be 1 to 3 rising layer numbers, like 2,6,15; got {self.layers!r}"
            )
        layers = [layer * depth // 32 for layer in layers]  # numbered as in a 32-layer LLM
        schedule = min(SCHEDULES, key=lambda counts: abs(counts[-1] / PAPER_N - budget / n))[-len(layers) :]
        cuts = {}  # rating layer -> tokens; a later stage on the same layer replaces an earlier one
        for layer, count in zip(layers, schedule):
            cuts[layer] = min(n, math.floor(budget * count / schedule[-1]))
        return [Cut(layer=layer + 1, score_layer=layer, tokens=k) for layer, k in cuts.items()]

    def select(self, s: Signals) -> Selection:
        visual, text = s[LLM_EMBEDS].float(), s[text_of(LLM_EMBEDS)].float()  # (N, D), (T, D) before any cut
        relevance = torch.softmax(visual @ text.T, dim=1).mean(0)  # (T,)
        raters = relevance > relevance.mean()
        raters = raters if raters.any() else torch.ones_like(raters)
        attention = s[LLM_ATTENTION][:, raters]  # (H, R, N), NaN columns for tokens cut before
        heads = attention.nansum((1, 2)).argsort(descending=True, stable=True)[: self.heads]
        scores = attention[heads].mean((0, 1))  # (N,)
        keep = top(scores, s.alive.nonzero()[:, 0], s.budget)
        return Selection(keep=keep.sort().values, scores=scores)
