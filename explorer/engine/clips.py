"""Image methods on a clip: each frame on its own, with a share of the clip's budget.

A clip's geometry has one partition per frame (or per temporal group of frames, where the family folds
frames together), plus the tokens that belong to no frame (OneVision's one newline after the last
frame). A method written for images reads one frame as it reads one image: `per_frame` splits the
budget over the frames in proportion to their tokens (largest remainder first; the tokens outside
frames get only what the frames cannot hold, as methods that drop newlines are given them), runs the
method's selection on each frame's signals, and joins what each kept, so the clip's count is met
exactly whenever each frame's is. Methods that read the whole clip (`Method.on_clips == "clip"`: the
`frames` baseline, the video methods) get the clip as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import Geometry, Selection, Signals
from ..methods.common import patches_first
from .video import Clip


def part(g: Geometry, tokens: torch.Tensor) -> Geometry:
    """The geometry of the tokens `tokens` (sorted, all of one partition) on their own, as one image."""
    p = int(g.partition[tokens[0]])
    return Geometry(
        (g.names[p],), torch.zeros(len(tokens), dtype=torch.long), g.cells[tokens], g.boxes[tokens], g.image_size
    )


def per_frame(select: Callable[[Signals], Selection], s: Signals) -> Selection:
    """`select` run on every frame of the clip with its share of `s.budget` (see the module's docstring);
    the tokens outside frames are kept, in order, when the share they get is not zero."""
    g, n = s.geometry, len(s.geometry)
    keep, scores, groups, weights = [], torch.full((n,), torch.nan), torch.full((n,), -1), []
    maps: dict[str, torch.Tensor] = {}
    shares, frames = patches_first(g, s.budget), g.frames
    for p, share in enumerate(shares):
        tokens = g.members(p)  # (M,) this frame's tokens, in LLM order
        if share == 0:
            continue
        if p not in frames or share == len(tokens):  # outside frames, or the whole frame: no choice
            keep.append(tokens[:share])
            continue
        mine = {name: _rows(value, tokens, n) for name, value in s.maps.items()}
        chosen = select(Signals(part(g, tokens), share, mine))
        keep.append(tokens[chosen.keep.cpu()])
        if chosen.scores is not None:
            scores[tokens] = chosen.scores.detach().float().cpu()
        if chosen.groups is not None:
            groups[tokens] = torch.where(chosen.groups.cpu() >= 0, tokens[chosen.groups.cpu().clamp(min=0)], -1)
        if chosen.weights is not None:
            weights.append((tokens[chosen.keep.cpu()], tokens, chosen.weights.coalesce()))
        for name, value in chosen.maps.items():
            maps.setdefault(name, torch.full((n,), torch.nan))[tokens] = value.detach().float().cpu()
    kept = torch.cat(keep).sort().values
    merges = bool(weights) or bool((groups >= 0).any())
    groups[kept] = kept  # a kept token is its own group (also in a frame kept whole, without a choice)
    return Selection(
        keep=kept,
        scores=None if scores.isnan().all() else scores,
        groups=groups if merges else None,
        weights=_joined(weights, kept, n) if weights else None,
        budgets=dict(zip(g.names, shares)),
        maps=maps,
    )


def _rows(value, tokens: torch.Tensor, n: int):
    """A signal's rows of one frame's tokens: tensors with a row per visual token are cut to the frame's;
    anything else (the prompt's text, LLM signals) passes as it is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value[tokens.to(value.device)]
    return value


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kept: torch.Tensor, n: int) -> torch.Tensor:
    """(K, N) sparse merge weights of the clip from each frame's (K_f, M_f): rows of frame f's kept tokens,
    columns of its tokens, placed where those tokens are in the clip."""
    row_of = torch.full((n,), -1, dtype=torch.long)
    row_of[kept] = torch.arange(len(kept))
    alone = torch.ones(len(kept), dtype=torch.bool)  # kept tokens of frames without weights carry themselves
    rows, cols, values = [], [], []
    for frame_kept, tokens, w in parts:
        (r, c), v = w.indices(), w.values()
        rows.append(row_of[frame_kept[r]])
        cols.append(tokens[c])
        values.append(v)
        alone[row_of[frame_kept]] = False
    rows.append(alone.nonzero()[:, 0])
    cols.append(kept[alone])
    values.append(torch.ones(int(alone.sum()), dtype=values[0].dtype))
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(values), (len(kept), n), check_invariants=True).coalesce()


def frames_of(name: str) -> list[int]:
    """The positions among the clip's frames that a partition shows: "frame 3" -> [3], "frames 2-3" (a
    temporal group) -> [2, 3]; [] for tokens outside frames."""
    kind, _, span = name.partition(" ")
    if kind not in ("frame", "frames"):
        return []
    first, _, last = span.partition("-")
    return list(range(int(first), int(last or first) + 1))


def by_frame(g: Geometry, keep: torch.Tensor, clip: Clip) -> list[dict]:
    """Per frame or temporal group of a run on `clip`: the frames' indices in the decoded video, the first
    one's time, and the group's visual tokens, full and kept; a token outside frames (OneVision's newline
    after the last frame) counts with the frame before it, so the rows add up to the clip's counts."""
    owner = torch.zeros(len(g), dtype=torch.long)  # (N,) the frame partition each token counts with
    shows = [frames_of(name) for name in g.names]
    last = next(p for p in g.partition.tolist() if shows[p])
    for token, p in enumerate(g.partition.tolist()):
        last = p if shows[p] else last
        owner[token] = last
    full = torch.bincount(owner, minlength=len(g.names)).tolist()
    kept = torch.bincount(owner[keep], minlength=len(g.names)).tolist()
    return [
        {"frames": [clip.indices[i] for i in shown], "time_s": clip.times_s[shown[0]], "full": full[p], "kept": kept[p]}
        for p, shown in enumerate(shows)
        if shown
    ]
