"""FastV (Chen, Zhao, Liu, Bai, Lin, Zhou and Chang, "An Image is Worth 1/2 Tokens After Layer 2:
Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764,
github.com/pkunlp-icler/FastV).

Layers 0..K-1 of the LLM see every visual token. Before layer K, keep the B tokens that the last
prompt token attends to most at layer K-1, heads averaged; layer K and every later layer, and their
KV caches, hold only those. Kept tokens keep their original positions.

Differs from the paper: the budget is the count B kept (the paper drops a ratio R of the image
tokens). The paper's text averages the attention of all tokens; its code, and this file, use the last
prompt token only. The kept set is fixed after the prefill, as in FastV's KV-cache code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..core import LLM_ATTENTION, Cut, Method, Selection, Signals
from .common import top


@dataclass(frozen=True)
class FastV(Method):
    layer: int = field(
        default=2, metadata={"help": "K: the first LLM layer that sees only the kept tokens", "range": (1, 100)}
    )
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION,)
    summary: ClassVar[str] = "FastV: before LLM layer K, keep the tokens the last prompt token attends to most"

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        return [Cut(layer=self.layer, score_layer=self.layer - 1, tokens=budget)]

    def select(self, s: Signals) -> Selection:
        return by_last_token(s)


def by_last_token(s: Signals) -> Selection:
    """The tokens still in the sequence that the last prompt token attends to most, heads averaged."""
    scores = s[LLM_ATTENTION][:, -1].mean(0)  # (N,) NaN for tokens cut before
    keep = top(scores, s.alive.nonzero()[:, 0], s.budget)
    return Selection(keep=keep.sort().values, scores=scores)
