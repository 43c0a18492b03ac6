"""[CLS] attention summed over several vision layers: VTC-CLS ("[CLS] Token Tells Everything Needed
for Training-free Efficient MLLMs", arXiv 2412.05819, github.com/THU-MIG/VTC-CLS).

FasterVLM (`cls`) ranks tokens by the [CLS] token's attention in one layer. One layer's attention
is noisy: a patch can be ignored in one layer and looked at in the next. VTC-CLS asks several
layers and adds up their votes: a token's score is the sum, over a range of vision layers ending at
the feature layer (the one whose output the LLM receives), of the [CLS] token's attention to it,
heads summed. Every partition (thumbnail, each crop) then keeps its top tokens by that sum.

Differs from the paper: the paper runs on LLaVA-1.5 (one 576-token image, one global top-k) and
averages the heads where we sum them (every layer scaled by the same head count: the same ranking);
here the budget, newlines included, is split over the partitions in
proportion to their sizes like `cls`, and the newline share is spread evenly over the rows. The
code picks the first layer of the range per run (`--layer`, each evaluation script's first
argument, 16 without one; its range runs to the penultimate layer, our feature layer); here `layers`
counts the layers of the range back from the feature layer, 2 by default (the feature layer and the
one below it) so that it runs on every model, the tiny test model included; on CLIP-L (feature layer
22) `layers` = 7 is the code's range from layer 16 and `layers` = 23 sums them all.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives in each layer of the range (mean over heads and queries) is summed instead, as
community ports do; a token that folds several patches gets their mean (see `explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import CLS, CLS_FEATURE, FEATURE, Method, Selection, Signals, at
from .common import by_size, spread, top


def layer_range(layers: int) -> tuple[str, ...]:
    """The cls@ signals of `layers` vision layers ending at the feature layer, lowest first."""
    return tuple(at(CLS, f"{FEATURE}-{k}") for k in range(layers - 1, 0, -1)) + (CLS_FEATURE,)


@dataclass(frozen=True)
class VTCCLS(Method):
    layers: int = field(
        default=2,
        metadata={
            "help": "vision layers whose [CLS] attention is summed, ending at the feature layer",
            "range": (1, 23),
        },
    )

    needs: ClassVar[tuple[str, ...]] = layer_range(2)  # for these settings; an instance names its own
    summary: ClassVar[str] = "VTC-CLS: top tokens by [CLS] attention summed over several vision layers, per crop"

    def __post_init__(self):
        object.__setattr__(self, "needs", layer_range(self.layers))  # the signals of this range

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        scores = torch.stack([s[name] for name in self.needs]).sum(0)  # (N,) NaN stays NaN for newlines
        budgets = by_size(g, s.budget)
        keep = [
            spread(g, p, k) if name == "newline" else top(scores, g.members(p), k)
            for p, (name, k) in enumerate(zip(g.names, budgets))
        ]
        return Selection(keep=torch.cat(keep).sort().values, scores=scores, budgets=dict(zip(g.names, budgets)))
