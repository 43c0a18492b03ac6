"""Spatially uniform dropping: evenly spaced tokens in every partition, each partition's share of the
budget in proportion to its size. The "pooling" baseline of UniPruneBench (Peng et al., 2025,
arXiv 2511.02650) and of Wen et al. (arXiv 2502.11501).

Differs from the papers: keeps evenly spaced tokens instead of averaging windows of them, so every
kept token is a real token with a place on the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import Method, Selection, Signals
from .common import by_size, spread


@dataclass(frozen=True)
class Pooling(Method):
    summary: ClassVar[str] = "evenly spaced tokens in every crop, in proportion to its size (baseline)"

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        budgets = by_size(g, s.budget)
        keep = torch.cat([spread(g, p, k) for p, k in enumerate(budgets)])
        return Selection(keep=keep.sort().values, budgets=dict(zip(g.names, budgets)))
