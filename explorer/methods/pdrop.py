"""PyramidDrop (Xing, Huang, Dong, Lu, Zhang, Zang, Cao, He, Wang, Wu and Lin, "PyramidDrop:
Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025,
arXiv 2410.17247, github.com/Cooperx521/PyramidDrop).

The LLM is split into S + 1 stages of equal depth (S = 3 on a 32-layer LLM: cuts before layers 8, 16
and 24). Before the first layer of each later stage, the visual tokens still there are ranked by the
attention of the last instruction token, computed with that layer's own input norm, queries and keys
(heads averaged), and only the top ones stay, a ratio lambda fewer at each stage. The official code
keeps int(N lambda^s) at stage s (llava/model/modeling_llama_pdrop.py L1306-1307; its scripts pass
lambda = 1/2: 288/144/72 of 576). Here those counts are scaled by b / int(N lambda^S) (rounded down),
so that the last stage keeps b: the official counts exactly when b = int(N lambda^S). The budget B is
the mean visual tokens over the LLM's layers, and b the largest whose stages keep that mean at most
B: B = 270 of 576 on 32 layers gives the official 288/144/72 (mean 270); B = 192 gives 108/54/27
(mean 191.25). With `budget_after_cuts`, b = B. Kept tokens are renumbered.

Differs from the paper: the paper's "192/128/64 tokens" are such layer means, reached with other
layer lists (PyramidDrop issues #10, #29), which its code does not hold; here the stages stay equally
spaced, so the layers before the first cut already spend N / (S + 1) on average and B must be above
that (144 of 576 with S = 3). On an LLM too shallow for S distinct stages, stages that fall on the
same layer merge. The official code casts the attention to fp16 before averaging the heads and ranks
with torch.topk; here all is fp32, ties to the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

from ..core import LLM_ATTENTION, Cut, Method, Selection, Signals
from .common import budget_after_cuts
from .fastv import by_last_token


@dataclass(frozen=True)
class PyramidDrop(Method):
    stages: int = field(default=3, metadata={"help": "S: how many times tokens are dropped", "range": (1, 8)})
    ratio: float = field(
        default=0.5, metadata={"help": "lambda: the share of tokens each stage keeps", "range": (0.05, 1.0)}
    )
    keep_positions: bool = field(
        default=False, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION,)
    summary: ClassVar[str] = "PyramidDrop: at S equally spaced LLM layers, keep a lambda share by last-token attention"

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        official = [max(1, math.floor(n * Fraction(str(self.ratio)) ** s)) for s in range(self.stages + 1)]
        cuts = {}  # layer -> tokens; a later stage on the same layer replaces an earlier one
        for s in range(1, self.stages + 1):
            layer = max(1, depth * s // (self.stages + 1))
            cuts[layer] = min(n, official[s] * budget // official[-1])  # the official int(N lambda^s), scaled
        return [Cut(layer=layer, score_layer=layer, tokens=k) for layer, k in cuts.items()]

    def select(self, s: Signals) -> Selection:
        return by_last_token(s)
