"""PyramidDrop (Xing, Huang, Dong, Lu, Zhang, Zang, Cao, He, Wang, Wu and Lin, "PyramidDrop:
Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025,
arXiv 2410.17247, github.com/Cooperx521/PyramidDrop).

The LLM is split into S + 1 stages of equal depth (S = 3 on a 32-layer LLM: cuts before layers 8, 16
and 24). Before the first layer of each later stage, the visual tokens still there are ranked by the
attention of the last instruction token, computed with that layer's own input norm, queries and keys
(heads averaged), and only the top ones stay, a ratio lambda fewer at each stage: 1/2, 1/4, 1/8 of the
image's tokens by default. Kept tokens are renumbered.

Differs from the paper: the schedule is rescaled so that the last stage keeps exactly the budget B:
stage s of S keeps min(N, floor(B / lambda^(S - s))) tokens (the paper keeps lambda^s of N whatever
the budget). On an LLM too shallow for S distinct stages, stages that fall on the same layer merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..core import LLM_ATTENTION, Cut, Method, Selection, Signals
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

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION,)
    summary: ClassVar[str] = "PyramidDrop: at S equally spaced LLM layers, keep a lambda share by last-token attention"

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        cuts = {}  # layer -> tokens; a later stage on the same layer replaces an earlier one
        for s in range(1, self.stages + 1):
            layer = max(1, depth * s // (self.stages + 1))
            cuts[layer] = min(n, math.floor(budget / self.ratio ** (self.stages - s)))
        return [Cut(layer=layer, score_layer=layer, tokens=k) for layer, k in cuts.items()]

    def select(self, s: Signals) -> Selection:
        return by_last_token(s)
