"""TransPrune inside the LLM, as the paper does it (Li, Duan, Zhang, Ma, Xie, Carneiro, Yaqub and Wang,
"TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model", CVPR 2026, arXiv
2507.20630, github.com/liaolea/TransPrune); `transprune` is its TTV half alone, in the vision encoder.

Two views of a visual token are added. Token Transition Variation (TTV): how much the LLM's layers
transform it; in each layer from the one before the first cut on, the attention and the MLP each
compare the token as they read it (normalised) with what they add to it: the length of the update
over the length of the input, times the softmax over the whole sequence of 1 minus their cosine
similarity, summed over both sublayers and the layers. Instruction-Guided Attention (IGA): the
attention of the prompt's text (after the image) to the token, at the cut layer, averaged over the
heads and the text tokens. Each is divided by its sum over the visual tokens still there, the two
are added, and the top tokens stay. Tokens are cut progressively, before layers 7, 9 and 12, keeping
7/8, 5/8 and 1/8 of the image's tokens (the official LLaVA scripts); TTV goes on accumulating from
layer 6 over the kept tokens. Kept tokens are renumbered.

The budget B is the mean visual tokens over the LLM's layers: the counts are rescaled so that the
last cut keeps b (cut s keeps min(N, floor(b * r_s / r_last)) for the shares r), b the largest whose
cuts keep that mean at most B: on a 32-layer LLM, B = 192 of 576 keeps 301/215/43, a mean of 191.8,
and B = 237 the official 504/360/72 (a mean of 236.25). With `budget_after_cuts`, b = B.

Differs from the paper: the counts are rescaled to the budget (the paper keeps its shares of N);
`layers` are numbered as in a 32-layer LLM and scaled to the model's depth (layer l becomes max(1,
floor(l * depth / 32))), stages that fall on the same layer merge. TTV's accumulation starts at the layer before the first cut, as the code's
(layers 7 to 12, counted from 1) does for its default cuts, whatever the cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import LLM_ATTENTION, LLM_TRANSITION, Cut, ExplorerError, Method, Selection, Signals
from .common import budget_after_cuts, top


@dataclass(frozen=True)
class TransPruneLLM(Method):
    layers: str = field(
        default="7,9,12", metadata={"help": "LLM layers before which tokens are cut, as in a 32-layer LLM"}
    )
    shares: str = field(
        default="0.875,0.625,0.125",
        metadata={"help": "share of the image's tokens each cut keeps, rescaled so the last keeps the budget"},
    )
    keep_positions: bool = field(
        default=False, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION, LLM_TRANSITION)
    summary: ClassVar[str] = (
        "TransPrune (TTV + IGA): before LLM layers 7, 9, 12, keep the tokens the layers transform most plus "
        "those the prompt attends to"
    )

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        try:
            layers = [int(layer) for layer in self.layers.split(",")]
            shares = [float(share) for share in self.shares.split(",")]
        except ValueError:
            layers, shares = [], []
        if not layers or len(layers) != len(shares) or layers != sorted(set(layers)) or layers[0] < 1:
            raise ExplorerError(
                f"transprune-llm: layers must be rising layer numbers from 1 and shares one number per layer; "
                f"got {self.layers!r} and {self.shares!r}"
            )
        if shares != sorted(shares, reverse=True) or not 0 < shares[-1] <= shares[0] <= 1:
            raise ExplorerError(f"transprune-llm: shares must fall, between 0 and 1; got {self.shares!r}")
        cuts = {}  # layer -> tokens; a later stage on the same layer replaces an earlier one
        for layer, share in zip(layers, shares):
            scaled = min(max(1, layer * depth // 32), depth - 1)
            cuts[scaled] = min(n, math.floor(budget * share / shares[-1]))
        cuts[scaled] = budget
        return [Cut(layer=layer, score_layer=layer, tokens=k) for layer, k in cuts.items()]

    def select(self, s: Signals) -> Selection:
        ttv, iga = combined_parts(s)
        scores = ttv + iga  # (N,) NaN for tokens cut before
        keep = top(scores, s.alive.nonzero()[:, 0], s.budget)
        return Selection(keep=keep.sort().values, scores=scores, maps={"TTV share": ttv, "IGA share": iga})


def combined_parts(s: Signals) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) each: the TTV and the instruction-guided attention of the visual tokens, each divided by
    its sum over the tokens still there."""
    ttv = s[LLM_TRANSITION].float()
    iga = s[LLM_ATTENTION].float().mean((0, 1))  # heads and text tokens averaged
    return ttv / ttv.nansum(), iga / iga.nansum()
