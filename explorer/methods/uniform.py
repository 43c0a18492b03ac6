"""Uniform: k visual tokens evenly spaced in the order the LLM reads them, chosen without looking at
the image.

It reads no signal and scores nothing, so its run is the model fed exactly k visual tokens with no
selection work at all: the floor that `python -m explorer bench` measures every method against (a
method's time to first token over this floor is the overhead it costs). It is also a baseline, like
`random`, with a regular pattern instead of a random one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import Method, Selection, Signals


@dataclass(frozen=True)
class Uniform(Method):
    summary: ClassVar[str] = "k tokens evenly spaced in LLM order, no scores (the floor bench measures against)"

    def select(self, s: Signals) -> Selection:
        n = len(s.geometry)
        return Selection(keep=torch.arange(s.budget) * n // max(s.budget, 1))  # (B,) increasing, as B <= N
