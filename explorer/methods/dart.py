"""DART (Wen, Gao, Wang, Zhang, Zhang, Li, He and Zhang, "Stop Looking for Important Tokens in
Multimodal Language Models: Duplication Matters More", EMNLP 2025, arXiv 2502.11494,
github.com/ZichenWen1/DART).

Keeps the visual tokens that duplicate others least, and needs no attention weights. Before LLM layer
K: the pivots are the visual tokens and the text tokens (after the image) whose layer K-1 keys, after
RoPE and with heads concatenated, have the largest L1 norms. Pivot by pivot, the tokens whose hidden
states entering layer K (through the final norm) are least cosine-similar to the pivot's are kept,
each from those not kept yet. The image pivots are kept too. Kept tokens keep their original positions.

Differs from the paper: the budget is met exactly. Beyond the image pivots, B - P_image tokens are
shared over the pivots as evenly as possible, the first pivots taking one more. The official code
gives each pivot floor(B / (P_image + P_text)) and so keeps P_image more than B. A budget below
P_image keeps the top B image pivots. Pivots are visited image first, each group by falling norm
(the code iterates over a Python set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import LLM_HIDDEN, LLM_KEYS, Cut, Method, Selection, Signals, text_of
from .common import top


@dataclass(frozen=True)
class DART(Method):
    layer: int = field(
        default=2, metadata={"help": "K: the first LLM layer that sees only the kept tokens", "range": (1, 100)}
    )
    image_pivots: int = field(default=4, metadata={"help": "visual pivot tokens (always kept)", "range": (1, 64)})
    text_pivots: int = field(default=4, metadata={"help": "text pivot tokens, from the prompt", "range": (0, 64)})
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_KEYS, LLM_HIDDEN)
    summary: ClassVar[str] = "DART: before LLM layer K, keep the tokens least similar to a few key-norm pivots"

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        return [Cut(layer=self.layer, score_layer=self.layer - 1, tokens=budget)]

    def select(self, s: Signals) -> Selection:
        alive = s.alive.nonzero()[:, 0]  # (M,)
        norm, text_norm = s[LLM_KEYS].abs().sum(1), s[text_of(LLM_KEYS)].abs().sum(1)  # (N,), (T,) L1 norms
        image = top(norm, alive, min(self.image_pivots, s.budget))
        text = top(text_norm, torch.arange(len(text_norm), device=alive.device), self.text_pivots)
        hidden = torch.nn.functional.normalize(s[LLM_HIDDEN].float(), dim=-1)  # (N, D) unit rows, NaN where cut
        pivots = torch.cat([hidden[image], torch.nn.functional.normalize(s[text_of(LLM_HIDDEN)][text].float(), dim=-1)])

        left, kept = s.budget - len(image), [image]
        candidates = alive[~torch.isin(alive, image)]
        for i, pivot in enumerate(pivots):
            k = left // len(pivots) + (i < left % len(pivots))
            similarity = hidden[candidates] @ pivot  # (M,) cosine
            pick = top(-similarity, torch.arange(len(candidates), device=alive.device), k)
            kept.append(candidates[pick])
            candidates = candidates[~torch.isin(candidates, candidates[pick])]

        uniqueness = torch.full_like(norm, torch.nan)  # 1 - the highest cosine similarity to a pivot
        uniqueness[alive] = 1 - (hidden[alive] @ pivots.T).amax(1)
        return Selection(keep=torch.cat(kept).sort().values, scores=uniqueness, maps={"key norm": norm})
