"""Free Video-LLM: the frames the prompt asks about, each cropped to the region it asks about.

Kai Han, Jianyuan Guo, Yehui Tang, Wei He, Enhua Wu, Yunhe Wang, "Free Video-LLM: Prompt-guided Visual
Perception for Efficient Training-free Video LLMs", arXiv 2410.10441 (2024); official code:
github.com/contrastive/FreeVideoLLM (free_video_llm/llava/model/llava_arch.py).

A CLIP model reads the prompt beside the frames (the signals "prompt-frame@<model>" and
"prompt-patch@<model>", `backends.prompt_clip`; default the official openai/clip-vit-large-patch14-336,
the `text_encoder` setting names another Hub id or a local folder). Temporal: the frames (or temporal
groups) are ranked by the cosine of the prompt's and the frame's CLIP embeddings, most alike first
(`text_guided_frames`). Spatial: in each, the top `roi_ratio` share of its tokens by prompt-patch
similarity give a centre, their mean cell, truncated; the region is a box of round(rows * sqrt(ratio))
x round(cols * sqrt(ratio)) cells about it, moved inside the grid where it overhangs (`roi_crop`,
`roi_box`). The frames keep their regions in that order until the budget runs out; the last one keeps
the tokens of its region most like the prompt, so the count is exact. A budget past every frame's region
takes the tokens left most like the prompt, tokens outside frames (OneVision's newline) last.

Differs from the paper: the official code sets the frame count and the region ratio and gets its token
count from them; here the budget sets the count, the frames follow from it and the last one is cut
short. It keeps the slow pathway alone (prompt-chosen frames, cropped): the official code (7B config) also
feeds a middle pathway (5 evenly spaced frames, cropped) and a fast pathway (every frame average-pooled to
4 x 4), and max-pools the slow and middle ones 2:1 along rows, all pooled tokens, which a selection does
not make. The official CLIP tower is the VLM's own (LLaVA-1.6) and its patch grid the tokens' grid; here
it is a second model beside the VLM and its patch embeddings are pooled onto each frame's token grid by
area; the official box is drawn on the max-pooled 24 x 12 grid read as 12 rows of 24 (`h, w = sqrt(N) //
2, sqrt(N)`), here on each frame's own rows and columns. The prompt is cut at CLIP's 77 positions (the
official code fails past them). The CLIP pass is not in the run's computed `vision_flops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import PROMPT_FRAME, PROMPT_PATCH, Geometry, Method, Selection, Signals, at
from .common import top

CLIP_L = "openai/clip-vit-large-patch14-336"  # the official code's: LLaVA-1.6's vision tower, with its text tower


@dataclass(frozen=True)
class FreeVideoLLM(Method):
    summary: ClassVar[str] = (
        "video: the frames most like the prompt (CLIP), each cropped to the region most like it (Free Video-LLM)"
    )
    on_clips: ClassVar[str] = "clip"
    requires: ClassVar[tuple[str, ...]] = ("clip",)
    needs: ClassVar[tuple[str, ...]] = (at(PROMPT_FRAME, CLIP_L), at(PROMPT_PATCH, CLIP_L))  # an instance: its own

    roi_ratio: float = field(
        default=0.8,
        metadata={"help": "the share of a chosen frame's grid its region covers (official: 0.8)", "range": (0.1, 1.0)},
    )
    text_encoder: str = field(
        default=CLIP_L,
        metadata={"help": "the CLIP model that reads the prompt and the frames: a Hub id or a local folder"},
    )

    def __post_init__(self):
        object.__setattr__(self, "needs", (at(PROMPT_FRAME, self.text_encoder), at(PROMPT_PATCH, self.text_encoder)))

    def select(self, s: Signals) -> Selection:
        g = s.geometry
        frame, patch = s[self.needs[0]].float().cpu(), s[self.needs[1]].float().cpu()  # (N,) each, NaN outside frames
        frames = g.frames
        alike = torch.stack([frame[g.members(p)[0]] for p in frames])  # (P,) each frame's similarity to the prompt
        order = torch.sort(alike, stable=True).indices.flip(0)  # most alike first, ties to the later, as [-k:] there
        ranked = [frames[i] for i in order.tolist()]
        keep, inside, left = [], torch.full((len(g),), math.nan), s.budget
        inside[torch.cat([g.members(p) for p in frames])] = 0.0
        for p in ranked:
            if left == 0:
                break
            region = self.region(g, p, patch)  # (R,) sorted
            inside[region] = 1.0
            keep.append(region if len(region) <= left else top(patch, region, left))
            left -= len(keep[-1])
        if left:  # past every region: the tokens left most like the prompt, those outside frames last
            rest = torch.ones(len(g), dtype=torch.bool)
            rest[torch.cat(keep)] = False
            keep.append(top(patch.nan_to_num(-math.inf), rest.nonzero()[:, 0], left))
        kept = torch.cat(keep).sort().values
        counts = torch.bincount(g.partition[kept], minlength=len(g.names)).tolist()
        maps = {"prompt-frame similarity": frame, "prompt region": inside}
        return Selection(keep=kept, scores=patch, budgets=dict(zip(g.names, counts)), maps=maps)

    def region(self, g: Geometry, p: int, patch: torch.Tensor) -> torch.Tensor:
        """(R,) sorted: partition p's tokens inside its region, a box of `roi_ratio` of its grid about the
        mean cell of its tokens most like the prompt (llava_arch.py `roi_crop`, `roi_box`)."""
        tokens = g.members(p)
        cells = g.cells[tokens] - g.cells[tokens].amin(0)  # (M, 2) row, column in the partition's grid
        h, w = g.grid(p)
        count = max(1, int(h * w * self.roi_ratio))
        best = torch.argsort(patch[tokens], descending=True, stable=True)[:count]
        y, x = cells[best].float().mean(0).to(torch.int32).tolist()  # truncated, as there
        h_new, w_new = (max(1, round(side * math.sqrt(self.roi_ratio))) for side in (h, w))
        row0, col0 = min(max(y - h_new // 2, 0), h - h_new), min(max(x - w_new // 2, 0), w - w_new)  # in the grid
        rows, cols = cells[:, 0] - row0, cells[:, 1] - col0
        return tokens[(rows >= 0) & (rows < h_new) & (cols >= 0) & (cols < w_new)]
