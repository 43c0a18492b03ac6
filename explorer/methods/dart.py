"""DART (Wen, Gao, Wang, Zhang, Zhang, Li, He and Zhang, "Stop Looking for Important Tokens in
Multimodal Language Models: Duplication Matters More", EMNLP 2025, arXiv 2502.11494,
github.com/ZichenWen1/DART).

Keeps the visual tokens that duplicate others least, and needs no attention weights. Before LLM layer
K: the pivots are the visual tokens and the text tokens (after the image) whose layer K-1 keys, after
RoPE and with heads concatenated, have the largest L1 norms. Pivot by pivot, the tokens whose hidden
states entering layer K (through the final norm) are least cosine-similar to the pivot's are kept,
each from those not kept yet. The image pivots are kept too. Kept tokens keep their original positions.
The budget B is the mean visual tokens over the LLM's layers, so the count kept, R, is the largest
with (K N + (depth - K) R) / depth at most B (`budget_after_cuts`: R = B).

Differs from the paper: R is met exactly. Beyond the image pivots, R - P_image tokens are shared over
the pivots as evenly as possible, the first pivots taking one more. The official code
(llava/model/language_model/modeling_llama_self.py L409, L431-443) gives each pivot floor(R / (P_image
+ P_text)) and so keeps P_image + P floor(R / P): 132 for its "128" (P = 8); here R = 132 keeps the same
132, 16 per pivot. A budget below P_image keeps the top R image pivots. Pivots are visited image first,
each group by falling norm; the official code visits them in the order of a Python set of their
prompt positions (L429, L434), which `official_order` follows; the order decides which pivot takes a
token that is among the least similar to two. The official code computes norms and similarities in
fp16 and ranks with torch.topk; here in fp32, ties to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import LLM_HIDDEN, LLM_KEYS, LLM_POSITIONS, Cut, Method, Selection, Signals, text_of
from .common import budget_after_cuts, top


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
    official_order: bool = field(
        default=False,
        metadata={
            "help": "visit the pivots as the official code does: in the order of a Python set of their positions"
        },
    )
    budget_after_cuts: bool = budget_after_cuts()

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_KEYS, LLM_HIDDEN, LLM_POSITIONS)
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
        if self.official_order:
            pivots = pivots[set_order(s[LLM_POSITIONS][image], s[text_of(LLM_POSITIONS)][text])]

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


def set_order(image: torch.Tensor, text: torch.Tensor) -> list[int]:
    """The order in which the official code visits its pivots: that of a Python set built from their
    prompt positions, image pivots then text pivots, each by falling norm (`image`, `text`: (P,) long),
    as indices into that concatenation."""
    positions = [*image.tolist(), *text.tolist()]
    return [positions.index(p) for p in set(positions)]
