"""Token Transition Variation: the TTV half of TransPrune (Li, Duan, Zhang, Ma, Xie, Carneiro, Yaqub
and Wang, "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model", CVPR 2026,
arXiv 2507.20630, github.com/liaolea/TransPrune).

Instead of asking where attention goes, TransPrune watches how much each token is changed by the
layers it passes through: a token that a layer transforms a lot carries something the model is still
working on, while one that passes through nearly untouched adds little. For each layer and token,
the transition compares the token before the layer with the update the layer adds to it: its
magnitude is the length of the update over the length of the token, its direction change is 1 minus
their cosine similarity, turned into a share of the whole image by a softmax over the tokens; the
token's TTV is magnitude times direction share, summed over a range of layers. Every partition
(thumbnail, each crop) keeps its top tokens by TTV.

Differs from the paper: TransPrune scores visual tokens inside the LLM (TTV of each attention and
each MLP, accumulated over the LLM layers before a pruning layer) and adds Instruction-Guided
Attention (the prompt's attention to the image), pruning progressively; here only TTV is used,
measured in the vision encoder on layer outputs (`hidden@` signals): a layer's attention and MLP
count as one transition, "before" is the layer's input (the residual stream, not its normalised copy)
and "after" is what the layer adds, and the softmax runs over the image's visual tokens, not the whole
sequence (`transprune-llm` is the paper's own form, inside the LLM with both scores). `transitions`
counts the layers ending at the feature layer, 1 by default (the feature
layer alone, so that it runs on every model, the tiny test model included). The budget, newlines
included, is split over the partitions in proportion to their sizes, newlines spread evenly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURE, HIDDEN, HIDDEN_FEATURE, Method, Selection, Signals, at
from .common import by_size, spread, top


def hidden_range(transitions: int) -> tuple[str, ...]:
    """The hidden@ signals bounding `transitions` layers that end at the feature layer, lowest first."""
    return tuple(at(HIDDEN, f"{FEATURE}-{k}") for k in range(transitions, 0, -1)) + (HIDDEN_FEATURE,)


def transition_variation(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(M,) TTV of one layer for M tokens: |update| / |input| times softmax over the tokens of
    (1 - cos(input, update)); `before` is each token's input (M, C), `after` its output (M, C)."""
    update = after - before
    magnitude = update.norm(dim=-1) / before.norm(dim=-1)
    direction = torch.softmax(1 - F.cosine_similarity(before, update, dim=-1), dim=0)
    return magnitude * direction


@dataclass(frozen=True)
class TransPrune(Method):
    transitions: int = field(
        default=1,
        metadata={
            "help": "vision layers whose token transitions are summed, ending at the feature layer",
            "range": (1, 22),
        },
    )

    needs: ClassVar[tuple[str, ...]] = hidden_range(1)  # for these settings; an instance names its own
    summary: ClassVar[str] = "TransPrune (TTV): top tokens by how much the vision layers change them, per crop"

    def __post_init__(self):
        object.__setattr__(self, "needs", hidden_range(self.transitions))  # the signals of this range

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        states = [s[name].float().cpu() for name in self.needs]  # (N, C) each, NaN rows for newlines
        real = ~states[0].isnan().any(1)  # (N,) tokens with an encoder output
        scores = torch.full((len(g),), math.nan)
        scores[real] = sum(transition_variation(a[real], b[real]) for a, b in zip(states, states[1:]))
        budgets = by_size(g, s.budget)
        keep = [
            spread(g, p, k) if name == "newline" else top(scores, g.members(p), k)
            for p, (name, k) in enumerate(zip(g.names, budgets))
        ]
        return Selection(keep=torch.cat(keep).sort().values, scores=scores, budgets=dict(zip(g.names, budgets)))
