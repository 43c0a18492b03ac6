"""No reduction: every visual token reaches the LLM, exactly as in stock transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import Method, Selection, Signals


@dataclass(frozen=True)
class NoReduction(Method):
    budgeted: ClassVar[bool] = False  # keeps everything whatever the budget
    summary: ClassVar[str] = "keep every visual token (the reference run)"

    def select(self, s: Signals) -> Selection:
        return Selection(keep=torch.arange(len(s.geometry)))
