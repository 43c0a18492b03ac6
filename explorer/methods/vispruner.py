"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 v2, github.com/Theia-4869/VisPruner;
the successor of FasterVLM, `cls`).

In every partition, of its share T of the budget:
1. important tokens: the top floor(important * T) by [CLS] attention of the feature layer;
2. diverse tokens: the others, in order of attention, lose their most duplicated members until the
   rest of T is left: each round splits them alternately into two sets A and B, scores every token
   of A by its highest cosine similarity to B (encoder outputs of the feature layer), and drops the
   r = min(8, what is still too many) highest of A.

`paper_code=True` follows the official code on LLaVA-NeXT (llava/model/llava_arch.py): every crop
the encoder saw, the thumbnail included, gets the same T = B // (1 + crops) (the remainder unspent),
int(important * T) of them important, and is ranked and thinned over all 576 positions of its padded
crop, padding included (with torch's unstable sort, as the code). The code's unpadding branch is never reached (it strips "_unpad" from the
merge type first), so it feeds the LLM its picks on padding too, and no newline; llava-hf's LLM has
no place for padding, so only the picks on real tokens are kept here, fewer than B
(`stats["padding picked"]` counts the rest). The paper's "32 * 5 = 160" on a 2x2 grid is B = 160
(`--tokens 160`).

Differs from the paper: as `cls` (FasterVLM), the budget, newlines included, is split over the
partitions in proportion to their sizes (at B = 160 on a square image: 32, 32, 31, 31, 31 for the
thumbnail and the four crops, 3 for the newlines), and the newline share is spread evenly over the rows, where the code keeps T per
crop and no newline; it works on the real tokens only, where the code ranks and keeps the padding of
LLaVA-NeXT's crops too.

Without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT), the attention each
patch receives at the feature layer (mean over heads and queries) picks the important tokens
instead, as community ports do; a token that folds several patches gets their mean (see
`explorer.Signals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..core import CLS_FEATURE, HIDDEN_FEATURE, ROWS, Method, Selection, Signals, fraction_of, padded
from .common import by_size, encoder_grid, real_picks, spread

PADDED = (padded(CLS_FEATURE), padded(HIDDEN_FEATURE), ROWS)  # what paper_code reads besides `needs`


@dataclass(frozen=True)
class VisPruner(Method):
    important: float = field(
        default=0.5,
        metadata={
            "help": "share of each partition's tokens kept by [CLS] attention, the rest by diversity",
            "range": (0.0, 1.0),
        },
    )
    paper_code: bool = field(
        default=False,
        metadata={
            "help": "as the official code: the same count in every crop, no newlines, each crop ranked over "
            "its padded grid (picks on padding lost)"
        },
    )

    needs: ClassVar[tuple[str, ...]] = (CLS_FEATURE, HIDDEN_FEATURE)  # for these settings; an instance names its own
    summary: ClassVar[str] = "VisPruner: top [CLS] tokens, then duplicates removed from the rest, in every crop"

    def __post_init__(self):
        if self.paper_code:  # the crops' padded grids, as the official code ranks them
            object.__setattr__(self, "needs", (*type(self).needs, *PADDED))

    def select(self, s: Signals) -> Selection:
        if self.paper_code:
            return self.official(s)
        g, scores = s.geometry, s[CLS_FEATURE]
        x = F.normalize(s[HIDDEN_FEATURE], dim=-1)  # (N, C)
        budgets = by_size(g, s.budget)
        keep, diverse = [], torch.zeros(len(g))
        for p, (name, k) in enumerate(zip(g.names, budgets)):
            if name == "newline":
                keep.append(spread(g, p, k))
                continue
            members = g.members(p)
            important, rest = important_and_diverse(scores, x, members, k, fraction_of(self.important, k))
            keep += [important, rest]
            diverse[rest] = 1.0
        return Selection(
            keep=torch.cat(keep).sort().values,
            scores=scores,
            budgets=dict(zip(g.names, budgets)),
            maps={"diverse": diverse},
        )

    def official(self, s: Signals) -> Selection:
        """The official code's picks over every crop's padded grid, those on real tokens kept."""
        scores = s[padded(CLS_FEATURE)]  # (P, T') the thumbnail first
        crops, per_crop = scores.shape
        grid = encoder_grid(s, crops, per_crop)  # (P, T') the token at each position, -1 for padding
        x = F.normalize(s[padded(HIDDEN_FEATURE)], dim=-1)  # (P, T', C)
        t = s.budget // crops
        keep, diverse, lost = [], torch.zeros(len(s.geometry)), {}
        for crop in range(crops):
            positions = torch.arange(per_crop)
            n = int(t * self.important)
            important, rest = important_and_diverse(scores[crop], x[crop], positions, t, n, stable=False)
            tokens, lost[s.geometry.names[crop]] = real_picks(grid, crop, torch.cat([important, rest]))
            keep.append(tokens)
            diverse[grid[crop, rest][grid[crop, rest] >= 0]] = 1.0
        return Selection(
            keep=torch.cat(keep).sort().values,
            scores=s[CLS_FEATURE],
            budgets={name: t if name != "newline" else 0 for name in s.geometry.names},
            maps={"diverse": diverse},
            stats={"padding picked": lost},
        )


def important_and_diverse(scores, x, members: torch.Tensor, k: int, n: int, stable: bool = True):
    """VisPruner on `members` (indices into `scores` (M',) and the unit rows `x` (M', C)): (n,) the top n
    by score, and (k - n,) the rest, in order of score, left after dropping duplicates. Equal scores go
    to the lower index, or as torch's unstable sort leaves them (`stable=False`, as the official code)."""
    ranked = members[torch.argsort(scores[members], descending=True, stable=stable)]  # (M,) by attention
    rest = x.index_select(0, ranked[n:].to(x.device))  # (M - n, C) the others, in order of attention
    return ranked[:n], ranked[n:][without_duplicates(rest @ rest.T, k - n, stable=stable)]


def without_duplicates(similarity: torch.Tensor, k: int, per_round: int = 8, stable: bool = True) -> torch.Tensor:
    """The k of tokens 0, 1, ... (rows of the (M, M) cosine `similarity`, in this order) left after
    dropping, round after round, the most duplicated, as VisPruner does (equal scores: see
    `important_and_diverse`). The rounds run on the host, in numpy (a stable sort there orders as torch's
    stable sort does), but for the unstable sort, which stays torch's on the similarity's device: its
    order of equal scores is the device's."""
    columns = similarity.T.contiguous().cpu().numpy()  # (M, M): row j holds every token's similarity to token j
    ids = np.arange(len(columns))  # (M,) the token each row (and column) of `columns` stands for
    tokens = ids  # (M',) the tokens left, as rows of `columns`, in the order of the last round
    if k == 0:
        return torch.from_numpy(ids[:0])
    while (r := min(per_round, len(tokens) - k)) > 0:
        if 2 * len(tokens) < len(ids):  # the rounds read whole rows: keep them at most twice as long as needed
            columns, ids, tokens = columns.take(tokens, 0).take(tokens, 1), ids[tokens], np.arange(len(tokens))
        a, b = tokens[::2], tokens[1::2]
        # (|A|,) the highest similarity to B: whole rows read, no column gather
        duplication = columns.take(b, 0).max(0)[a]
        if stable:  # -x ascending, ties in order: torch's argsort(descending=True, stable=True), with no torch call
            order = np.argsort(-duplication, kind="stable")  # (|A|,)
        else:
            order = torch.from_numpy(duplication).to(similarity.device).argsort(descending=True).cpu().numpy()
        tokens = np.concatenate([a[order[r:]], b])
    return torch.from_numpy(ids[tokens])
