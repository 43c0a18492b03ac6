"""Frames: the uniform frame-subsampling baseline of video, at the same token budget.

Sampling fewer frames is what every video LLM does before any token is dropped, so it is the baseline
a video method must beat at equal tokens (the video token-reduction papers compare with it: FastVID,
VidCom2, HoliTom). For a budget of B tokens on a clip whose frames make s tokens each, it keeps
floor(B / s) whole frames, evenly spaced over the clip, and the remaining B mod s tokens from one more
frame, spread evenly over that frame's grid, so the count is exact. It reads no signal.

Differs from the paper: there is no paper; the usual baseline samples fewer frames before the decoder
reads the video, where this one chooses among the frames every method sees, so that all are compared at
the same count. As it reads no signal, only the frames it keeps go through the encoder
(`engine.pipeline.only_kept`), so it saves the encoder's work as sampling fewer frames does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import Method, Selection, Signals
from .common import spread


@dataclass(frozen=True)
class Frames(Method):
    summary: ClassVar[str] = (
        "video: whole frames, evenly spaced, at the same token budget (the frame-sampling baseline)"
    )
    on_clips: ClassVar[str] = "clip"
    requires: ClassVar[tuple[str, ...]] = ("clip",)

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        frames = g.frames  # "frame i", or a temporal group "frames i-j"
        size = len(g.members(frames[0]))  # the tokens of one frame (or temporal group)
        whole, rest = divmod(min(s.budget, size * len(frames)), size)
        count = whole + (rest > 0)
        picked = [frames[(2 * i + 1) * len(frames) // (2 * count)] for i in range(count)]  # evenly spaced
        keep = [g.members(p) for p in picked[:whole]] + ([spread(g, picked[whole], rest)] if rest else [])
        beyond = s.budget - whole * size - rest  # a budget past every frame's tokens takes the newline too
        keep.append(g.outside_frames()[:beyond])
        return Selection(keep=torch.cat(keep).sort().values)
