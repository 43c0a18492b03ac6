"""Token merging inside the vision tower: ToMe (Bolya, Fu, Dai, Zhang, Feichtenhofer and Hoffman,
"Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461, github.com/facebookresearch/ToMe).

This is ToMe as the paper runs it: in every block of the vision encoder up to the feature layer, the
patches are dealt alternately into two sides, A and B; every A patch finds its most similar B patch
(cosine similarity of the block's attention keys, heads averaged), and the r best-matched A patches
are merged into their partners. A merged token is the size-weighted mean of what it holds and the
rest of the encoder runs on the shorter sequence, so it is faster; with proportional attention,
every later block adds log(size) to the attention logits, so a token holding s patches counts as s
keys. r is constant over the blocks (the merges a partition needs, spread evenly). Each token
remembers the patches it holds (ToMe's `trace_source`): the overlay colours the groups, and the
token reaches the LLM at the place of the patch it began as, so the grid order the family needs
(LLaVA-NeXT's rows and newlines) is kept.

Differs from the paper: a block merges after its MLP, where ToMe merges between its attention and
its MLP (layer hooks can change what a block passes on, not what it does inside); the thumbnail and
each crop are merged down to their partition's share of the budget (split by size, newlines getting
only what the crops cannot hold, as `tome`), and since ToMe merges the same r in every image of a
batch, only crops with the same patches and share run through the encoder side by side; the padding
that unpadding removes (LLaVA-NeXT, OneVision) is never merged; and a block merges at most half its mergeable
tokens per round, taking further rounds on the summed keys when its share is larger (shallow
encoders, tiny budgets).

It needs every visual token to be one encoder patch projected on its own: LLaVA-NeXT, LLaVA-1.5, and
LLaVA-OneVision on images whose grid it does not resample (anyres_max_9 resamples grids of more than
about nine crops, and then it is refused). Elsewhere the LLM's tokens are made from the patches
after the encoder (SmolVLM and Qwen2-VL fold several patches into one token), so a group of merged
patches is not a set of whole tokens; `tome` merges after the encoder on every family. [CLS] is
protected where the encoder has one (CLIP); SigLIP has none, so every patch may merge. The time the
matching takes is spent inside the encoder and counted there; so are its computed FLOPs
(`cost.vision_flops`: every block on the tokens its crop still has, and the matching's products).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import MERGED_AFTER, MERGED_INTO, ExplorerError, Geometry, Merging, Method, Selection, Signals
from .common import patches_first, spread
from .tome import bipartite_match


@dataclass(frozen=True)
class ToMeViT(Method):
    proportional: bool = field(
        default=True,
        metadata={"help": "proportional attention: later blocks count a token that holds s patches as s keys"},
    )

    requires: ClassVar[tuple[str, ...]] = ("patch tokens",)
    summary: ClassVar[str] = (
        "ToMe in the vision tower: after every encoder block, merge the most alike patches (bipartite "
        "matching), with proportional attention, until the budget"
    )

    def merging(self, g: Geometry, budget: int) -> Merging:
        """What the backend's encoder does for this method (see `Backend.merged`)."""
        return Merging(patches_first(g, budget), bipartite_match, constant, self.proportional)

    def select(self, s: Signals) -> Selection:
        g, n = s.geometry, len(s.geometry)
        if MERGED_INTO not in s.maps:  # the encoder ran without this method's merging: only for the whole budget
            if s.budget < n:
                raise ExplorerError(
                    "tome-vit merges inside the vision encoder: its signals come from its `merging` plan"
                )
            return Selection(keep=torch.arange(n))
        budgets = patches_first(g, s.budget)
        into = s[MERGED_INTO]  # (N,) float, NaN for newlines
        groups = into.nan_to_num(-1).long()  # (N,)
        for p, (name, k) in enumerate(zip(g.names, budgets)):
            if name == "newline":
                kept = spread(g, p, k)
                groups[kept] = kept
            elif k == 0:  # the encoder left one token, which goes too
                groups[g.members(p)] = -1
        keep = (groups == torch.arange(n)).nonzero()[:, 0]  # (K,) sorted
        after = s[MERGED_AFTER]
        blocks = after[~after.isnan()].long()
        return Selection(
            keep=keep,
            groups=groups,
            budgets=dict(zip(g.names, budgets)),
            maps={"merged after block": after},
            stats={"merged after each block": {f"block {b}": int(c) for b, c in enumerate(torch.bincount(blocks))}},
        )


def constant(merges: int, blocks: int) -> list[int]:
    """ToMe's constant schedule: `merges` spread over `blocks` as evenly as whole numbers allow, the
    later blocks taking one more."""
    return [merges // blocks + (b >= blocks - merges % blocks) for b in range(blocks)]
