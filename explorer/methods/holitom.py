"""HoliTom (Shao, Tao, Qin, You, Sui and Wang, "HoliTom: Holistic Token Merging for Fast Video Large
Language Models", NeurIPS 2025, arXiv 2505.21334, github.com/cokeshao/HoliTom).

Before the LLM, on the projected tokens of a whole clip (a frame, or a temporal group of frames, is one
partition), as the official code does it (holitom/llava_arch.py, L29-311 and L370-407):
1. global temporal segmentation: a token is static between two neighbouring frames when its cosine
   similarity to the token at the same place in the next frame is above tau; the clip is cut into
   windows of consecutive frames that together merge away the most static tokens (a token static over
   a whole window of L frames becomes one token, saving L - 1), found by dynamic programming;
2. temporal merging: in each window, the tokens static over all of it become one token each, the mean
   of that place over the window's frames (kept at the window's first frame); the others stay in their
   frames (dynamic);
3. spatial merging: the static tokens of a window, and the dynamic tokens of each frame, keep their
   share of the budget; among the dynamic tokens, 1 - D of it are the most attended, the rest (and all
   of the static share) are DPC-kNN cluster centres (density from the K nearest), and every other token
   joins its nearest centre; a centre reaches the LLM as beta * itself + (1 - beta) * the mean of those
   that joined it (`Selection.weights`, mixing the projected features). Tokens not kept and not
   joined (dynamic tokens when D = 0) are dropped.
Tokens outside frames (OneVision's newline after the last frame) are kept, as the code keeps them.

Inside the LLM (holitom/modeling_qwen2.py L144-208, on when HOLITOM_k and HOLITOM_r are set; the paper's
runs set k = 18 of Qwen2-7B's 28 layers and r = 0.5, scaled here to the model's depth): before layer k
the visual tokens are ranked by the attention the last prompt token gives them at layer k - 1, heads
averaged; the round((1 - r) M) most attended of the M that entered stay, and every other one, in index
order, merges into its most alike kept token (cosine of the hidden states entering layer k), which becomes
the mean of the two: a kept token that m join carries 2^-m of itself and 2^-(m - i + 1) of the i-th
(`Selection.mixes` "llm-residual"). Layers k on run on the shorter sequence, kept tokens at their
positions. r = 0 is the paper's "HoliTom (w/o M)", nothing merged inside the LLM.

The budget B is, as for the other methods that prune inside the LLM, the mean visual tokens over the
LLM's layers: the step before the LLM keeps M = b / (1 - r) (rounded down, at most N), b the largest count
for which that mean, with M entering and b after layer k, is at most B; the merge then leaves the code's
round(M (1 - r)), at most b (with `budget_after_cuts`, b = B and the merge leaves B). That step meets M exactly: the
tokens outside frames first; the rest split over the windows' static sets and the frames' dynamic sets as
the code splits them, each set's size times one retain ratio (the code's RETAIN_RATIO / (1 - saved /
tokens)), rounded as the code rounds it (to the nearest for a static set, up for a frame's dynamic tokens,
then round((1 - D) * k) of those most attended), at the largest ratio that fits M, the few left over
going to the sets nearest their next count. The code's count is near RETAIN_RATIO * T * frames, not
floor(RETAIN_RATIO * N); given the count the code keeps, this keeps the code's tokens and merges
(tests/test_holitom.py). Where M is more than the windows leave (the code then keeps all they leave,
fewer than M), the windows that save the fewest split back into single frames until M fits.

Differs from the paper: density ties are broken by index, not by the code's 1e-6 noise; kept tokens stay
in LLM order at their own places (a static token at its place in the window's first frame), where the
code puts a window's static tokens first and each frame's most attended tokens before its merged ones.
The attention is the attention each token receives at the feature layer (mean over heads and queries),
as the code takes it from LLaVA-OneVision's SigLIP. Inside the LLM, the merge is summed in float32 from
the hidden states as they were (the code averages pair by pair in the model's dtype), ties in attention
and in similarity go to the lower index (the code: torch.topk's order, the more attended kept token),
and the merge is done only in the prefill (as the code: a decode step's new token is left alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import (
    CLS_FEATURE,
    FEATURES,
    LLM_ATTENTION,
    LLM_RESIDUAL,
    Cut,
    ExplorerError,
    Method,
    Selection,
    Signals,
)
from .common import Entries, budget_after_cuts, dpc_knn, sparse_rows, top

PAPER_DEPTH = 28  # the LLM its layer k is counted in (Qwen2-7B in LLaVA-OneVision-7B and LLaVA-Video-7B)


@dataclass(frozen=True)
class HoliTom(Method):
    threshold: float = field(
        default=0.8,
        metadata={
            "help": "tau: a token is static when it is more alike than this to the next frame's",
            "range": (-1.0, 1.0),
        },
    )
    max_window: int = field(
        default=1024, metadata={"help": "the most frames one window of static tokens may span", "range": (2, 1024)}
    )
    contextual: float = field(
        default=0.0,
        metadata={
            "help": "D: the share of a frame's dynamic tokens that are merged cluster centres",
            "range": (0.0, 1.0),
        },
    )
    beta: float = field(
        default=0.6, metadata={"help": "the weight a cluster centre keeps of itself in its merge", "range": (0.0, 1.0)}
    )
    neighbours: int = field(
        default=7, metadata={"help": "K: the nearest neighbours that set a token's density", "range": (1, 64)}
    )
    merge_layer: int = field(
        default=18,
        metadata={
            "help": "k: the LLM layer before which the least attended visual tokens merge into the others, as in "
            "a 28-layer LLM",
            "range": (1, 200),
        },
    )
    merge_ratio: float = field(
        default=0.5,
        metadata={
            "help": "r: the share of the visual tokens merged away at layer k; 0: no merge inside the LLM (the "
            "paper's HoliTom w/o M)",
            "range": (0.0, 0.95),
        },
    )
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()

    stage: ClassVar[str] = "llm"
    vision_needs: ClassVar[tuple[str, ...]] = (FEATURES, CLS_FEATURE)
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION, LLM_RESIDUAL)
    requires: ClassVar[tuple[str, ...]] = ("clip",)
    on_clips: ClassVar[str] = "clip"
    summary: ClassVar[str] = (
        "HoliTom: windows of frames whose static tokens merge over time, then density clustering "
        "and the most attended tokens in each frame; inside the LLM the least attended merge into the others"
    )

    def entering(self, n: int, budget: int) -> int:
        """M: what the step before the LLM keeps, the most tokens whose merge at layer k leaves at most the
        `budget` (M (1 - r) of them), at most n."""
        return min(n, max(budget, math.floor(budget / (1 - Fraction(str(self.merge_ratio))))))

    def layer(self, depth: int) -> int:
        """The layer before which the merge happens in an LLM of `depth` layers: k scaled, 1 to depth - 1."""
        return min(max(self.merge_layer * depth // PAPER_DEPTH, 1), depth - 1)

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        layer = self.layer(depth)  # scored at the layer before, whose attention the code reads
        return [Cut(layer=layer, score_layer=layer - 1, tokens=budget)]

    def mean_cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        """For a layer mean B: the code's count, round(n (1 - r)) of the n that entered (at least 1)."""
        cut = self.cuts(depth, n, max(1, round(n * (1 - self.merge_ratio))))[0]
        mean = (cut.layer * n + (depth - cut.layer) * cut.tokens) / depth
        if mean > budget:
            raise ExplorerError(
                f"holitom: a budget of {budget} visual tokens per LLM layer on average is less than it reaches: "
                f"the {n} tokens that enter the LLM go through its first {cut.layer} layers before the merge, a "
                f"mean of {mean:.1f}; raise the budget, or set budget_after_cuts=true"
            )
        return [cut]

    def select(self, s: Signals) -> Selection:
        """At layer k, as the code does it: the visual tokens the last prompt token attends to least (heads
        averaged) merge, one after another in index order, each into its most alike kept token (cosine of the
        hidden states there) as the mean of the two."""
        hidden = s[LLM_RESIDUAL].float()  # (N, D) NaN for tokens gone
        attention = s[LLM_ATTENTION][:, -1].float().mean(0)  # (N,) the last prompt token's, heads averaged
        alive = s.alive.nonzero()[:, 0]  # (M,)
        keep = top(attention, alive, s.budget).sort().values  # (K,)
        merged = alive[~torch.isin(alive, keep)]  # (P,) in index order
        x = F.normalize(hidden, dim=-1)
        into = keep[(x[merged] @ x[keep].T).argmax(1)].cpu()  # (P,) the most alike kept token
        keep, merged, n = keep.cpu(), merged.cpu(), len(s.geometry)
        groups = torch.full((n,), -1)
        groups[keep], groups[merged] = keep, into
        return Selection(
            keep=keep,
            scores=attention.cpu(),
            groups=groups,
            weights=halving(keep, merged, into, n) if len(merged) else None,
            mixes=LLM_RESIDUAL,
            stats={"HoliTom inside the LLM": {"merged": len(merged), "kept": len(keep)}},
        )

    def select_vision(self, s: Signals) -> Selection:
        """Before the LLM: the windows, then the temporal and spatial merging of the projected tokens, down to
        `entering(N, b)` tokens for the b that its cut inside the LLM leaves."""
        g = s.geometry
        budget = self.entering(len(g), s.budget)
        places = g.frame_grid()  # (F, T) the token at each place of each frame
        features = s[FEATURES].float().cpu()  # (N, D)
        attention = s[CLS_FEATURE].float().cpu()  # (N,)
        x = F.normalize(features[places], dim=-1)  # (F, T, D)
        similar = (x[:-1] * x[1:]).sum(-1) > self.threshold  # (F - 1, T)
        outside = g.outside_frames()[:budget]  # kept, as the code keeps the newline
        windows = undone(static_windows(similar, self.max_window), similar, budget - len(outside))
        sets = []  # (frames of the window, places): a window's static places, then each frame's dynamic ones
        for start, end in windows:
            static = similar[start:end].all(0) if end > start else torch.zeros(places.shape[1], dtype=torch.bool)
            sets += [(list(range(start, end + 1)), static.nonzero()[:, 0])] if end > start else []
            sets += [([f], (~static).nonzero()[:, 0]) for f in range(start, end + 1)]
        counts = shares([len(where) for _, where in sets], [len(w) > 1 for w, _ in sets], budget - len(outside))
        n = len(g)
        groups, rows = torch.full((n,), -1), []
        groups[outside] = outside
        for (window, where), k in zip(sets, counts):
            tokens = places[window][:, where]  # (L, M) the set's tokens in each of its frames
            dominant = where[:0]  # a window's static set: every token clustered
            if len(window) == 1:  # a frame's dynamic set: its most attended tokens kept as they are
                dominant = top(attention, tokens[0], round(k * (1 - self.contextual)))
            groups[dominant] = dominant
            members = tokens[:, ~torch.isin(tokens[0], dominant)]  # (L, R) the others, clustered
            centre, owner = clusters(features, members, k - len(dominant), self.neighbours)
            groups[members] = torch.where(owner >= 0, members[0][owner.clamp(min=0)], -1)
            rows.append(merge_rows(members, centre, owner, self.beta))
        keep = (groups == torch.arange(n)).nonzero()[:, 0]  # (K,) sorted
        window_of, static = torch.full((n,), torch.nan), torch.zeros(n)
        for i, (start, end) in enumerate(windows):
            window_of[places[start : end + 1]] = i
        for window, where in sets:
            static[places[window][:, where]] = float(len(window) > 1)
        static[g.outside_frames()] = torch.nan
        return Selection(
            keep=keep,
            scores=attention,
            groups=groups,
            weights=sparse_rows(rows, keep, n),
            mixes="features",
            budgets={name: int((g.partition[keep] == p).sum()) for p, name in enumerate(g.names)},
            maps={"HoliTom window": window_of, "static token": static},
            stats={
                "windows": {f"window {i}": end - start + 1 for i, (start, end) in enumerate(windows)},
                "segment": {g.names[g.frames[f]]: i for i, (a, b) in enumerate(windows) for f in range(a, b + 1)},
            },
        )


def halving(keep: torch.Tensor, merged: torch.Tensor, into: torch.Tensor, n: int) -> torch.Tensor:
    """(K, N) sparse merge weights of the code's merge: the `merged` tokens (P,), in index order, each set
    kept token `into` to the mean of the two, so one that m tokens join carries 2^-m of itself and
    2^-(m - i + 1) of the i-th to join."""
    target = torch.searchsorted(keep, into)  # (P,) the row each joins
    joining = torch.bincount(target, minlength=len(keep))  # (K,) m
    order = torch.argsort(target, stable=True)  # (P,) grouped by row, in index order within each
    first = joining.cumsum(0) - joining  # (K,) where each row's group starts in `order`
    earlier = torch.empty_like(target)  # (P,) i - 1: how many joined the same row before
    earlier[order] = torch.arange(len(order)) - first[target[order]]
    values = torch.cat([0.5 ** joining.double(), 0.5 ** (joining[target] - earlier).double()]).float()
    return sparse_rows([Entries(torch.cat([keep, into]), torch.cat([keep, merged]), values)], keep, n)


def static_windows(similar: torch.Tensor, max_window: int) -> list[tuple[int, int]]:
    """(first, last) frame of each window: the split of the clip into windows of at most `max_window`
    consecutive frames that merges away the most static tokens (`similar` (F - 1, T): token t alike in
    frames f and f + 1; a token static over a window of L frames saves L - 1). A frame on its own is
    preferred, then shorter windows, on ties."""
    frames = len(similar) + 1
    saved = torch.zeros(frames, frames)  # saved[a, b]: tokens merged away by the window a..b
    for a in range(frames - 1):
        still = similar[a:].long().cumprod(0).sum(1)  # (F - 1 - a,) tokens static over a..a+1+m
        saved[a, a + 1 :] = still * torch.arange(1, frames - a)
    saved = saved.tolist()  # whole numbers: the dynamic programme below on Python floats
    best, first = [0.0] * (frames + 1), [0] * frames  # best[i]: the most saved over frames 0..i-1
    for i in range(frames):
        best[i + 1], first[i] = best[i], i
        for a in range(i - 1, i - min(i + 1, max_window), -1):  # windows a..i of 2 frames, 3, ...
            if best[a] + saved[a][i] > best[i + 1]:
                best[i + 1], first[i] = best[a] + saved[a][i], a
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((first[i], i))
        i = first[i] - 1
    return windows[::-1]


def shares(sizes: list[int], static: list[bool], budget: int) -> list[int]:
    """Each set's count as the code counts it, its size times one retain ratio rounded (a window's static
    set to the nearest, a frame's dynamic set up), at the largest ratio whose counts fit the budget
    (found by bisection); what is left goes one each to the sets nearest their next count."""

    def counts(ratio: float) -> list[int]:
        return [min(n, round(n * ratio) if s else math.ceil(n * ratio)) for n, s in zip(sizes, static)]

    low, high = 0.0, 2.0  # counts(low) fit, counts(high) are every set whole
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(counts(middle)) <= budget else (low, middle)
    shares = counts(low)
    while sum(shares) < budget:
        open_ = [i for i, n in enumerate(sizes) if shares[i] < n]
        shares[max(open_, key=lambda i: (sizes[i] * low - shares[i], -i))] += 1
    return shares


def undone(windows: list[tuple[int, int]], similar: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """The windows, but where fewer tokens than `budget` would be left after their temporal merging, the
    windows that save the fewest (the later on ties) split back into single frames until enough are."""
    saved = {(a, b): int(similar[a:b].all(0).sum()) * (b - a) for a, b in windows}
    left = (len(similar) + 1) * similar.shape[1] - sum(saved.values())
    for a, b in sorted(windows, key=lambda w: (saved[w], -w[0])):
        if left >= budget or saved[(a, b)] == 0:
            continue
        windows = sorted(set(windows) - {(a, b)} | {(f, f) for f in range(a, b + 1)})
        left += saved[(a, b)]
    return windows


def clusters(
    features: torch.Tensor, members: torch.Tensor, k: int, neighbours: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN on the places of `members` (L, R), each the mean of its L frames' `features` (N, D): the k
    places of highest score (density from the min(K, k) nearest), sorted, and (R,) the centre (a column)
    each place joins, its nearest (Euclidean), a centre itself; -1 everywhere when k = 0."""
    owner = torch.full((members.shape[1],), -1)
    if k == 0:
        return torch.zeros(0, dtype=torch.long), owner
    x = features[members].mean(0)  # (R, D) a static place's mean over its window (L = 1: the token itself)
    score = dpc_knn(x, min(neighbours, k))  # (R,)
    centre = torch.argsort(score, descending=True, stable=True)[:k].sort().values  # (k,)
    owner = centre[torch.cdist(x, x[centre]).argmin(1)]  # (R,)
    owner[centre] = centre
    return centre, owner


def merge_rows(members: torch.Tensor, centre: torch.Tensor, owner: torch.Tensor, beta: float) -> Entries:
    """The merge weights of the centres, columns of `members` (L, R), the set's tokens in each of its L
    frames, kept at the first: beta * a centre's mean over the frames + (1 - beta) * the mean of the
    columns that joined it (`owner`), or its mean alone when none did."""
    frames, columns = members.shape
    joins = (owner >= 0) & (owner != torch.arange(columns))  # (R,) the columns that joined a centre
    joined = torch.bincount(owner[joins], minlength=columns).float()  # (R,) per centre column
    share = torch.where(joined > 0, beta, 1.0)  # (R,)
    into = torch.cat([centre, owner[joins]])  # the centre each column goes into, the centres first
    values = torch.cat([share[centre], ((1 - share) / joined.clamp(min=1))[owner[joins]]]) / frames
    tokens = torch.cat([members[:, centre], members[:, joins]], dim=1)  # (L, k + J)
    return Entries(members[0, into].repeat(frames), tokens.flatten(), values.repeat(frames))
