"""Random dropping: a uniformly random subset of the visual tokens, newlines included.

The baseline a method has to beat; it is stronger than it sounds (Wen et al., 2025, "Token Pruning
in Multimodal Large Language Models: Are We Solving the Right Problem?", arXiv 2502.11501).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import Method, Selection, Signals


@dataclass(frozen=True)
class Random(Method):
    seed: int = field(
        default=0, metadata={"help": "random seed: the same seed keeps the same tokens", "range": (0, 2**31 - 1)}
    )

    summary: ClassVar[str] = "a seeded, uniformly random subset of the visual tokens (baseline)"

    def select(self, s: Signals) -> Selection:
        generator = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(len(s.geometry), generator=generator)[: s.budget]  # (B,)
        return Selection(keep=keep.sort().values)
