"""Small helpers the methods share: budget splits, top-k with fixed tie order, even spacing, density peaks and
sparse merge weights."""

from __future__ import annotations

import math
from dataclasses import field
from fractions import Fraction
from typing import NamedTuple

import torch

from ..core import ROWS, ExplorerError, Geometry, Signals

BUDGET_AFTER_CUTS = (
    "count the budget as the visual tokens left after the last cut (else, as the papers compare methods that "
    "prune inside the LLM, as the mean visual tokens over the LLM's layers)"
)


def budget_after_cuts() -> bool:
    """The `budget_after_cuts` setting of every method that prunes inside the LLM (see `explorer.engine.llm`)."""
    return field(default=False, metadata={"help": BUDGET_AFTER_CUTS})


def allocate(total: int, weights: list[int] | list[Fraction], caps: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` (integers or exact fractions), largest remainder
    first (ties to the lower index), each share capped at `caps`; what a full share cannot take is
    handed on to the others in proportion to their weights, or to their caps when all their weights
    are zero."""
    shares = [0] * len(caps)
    left = min(total, sum(caps))
    open_ = [i for i, cap in enumerate(caps) if cap > 0]
    while left > 0:
        w = [weights[i] for i in open_]
        if sum(w) == 0:
            w = [caps[i] for i in open_]
        quota = [left * x // sum(w) for x in w]
        by_remainder = sorted(range(len(w)), key=lambda j: (-(left * w[j] % sum(w)), j))
        for j in by_remainder[: left - sum(quota)]:
            quota[j] += 1
        for j, i in enumerate(open_):
            take = min(quota[j], caps[i] - shares[i])
            shares[i] += take
            left -= take
        open_ = [i for i in open_ if shares[i] < caps[i]]
    return shares


def top(scores: torch.Tensor, members: torch.Tensor, k: int) -> torch.Tensor:
    """The k members with the highest scores (ties to the lower index)."""
    order = torch.argsort(scores[members], descending=True, stable=True)  # (M,)
    return members[order[:k]]


def lattice(rows: int, cols: int, k: int) -> torch.Tensor:
    """k cells spread evenly over a rows x cols grid, as raster indices: k/rows per row on evenly
    spaced rows, evenly spaced within each row (a 24x24 grid and k=144 gives every other cell of
    every other row)."""
    n_rows = min(rows, k, max(math.ceil(k / cols), round(math.sqrt(k * rows / cols)))) if k else 0
    per_row = [k // n_rows + (r < k % n_rows) for r in range(n_rows)]
    cells = []
    for r, n in enumerate(per_row):
        row = (2 * r + 1) * rows // (2 * n_rows)
        cells += [row * cols + (2 * c + 1) * cols // (2 * n) for c in range(n)]
    return torch.tensor(cells, dtype=torch.long)


def spread(geometry: Geometry, p: int, k: int) -> torch.Tensor:
    """k tokens of partition p spread evenly over its grid."""
    return geometry.members(p)[lattice(*geometry.grid(p), k)]


def by_size(geometry: Geometry, budget: int) -> list[int]:
    """The budget split over all partitions in proportion to their sizes."""
    sizes = geometry.sizes()
    return allocate(budget, sizes, sizes)


def patches_first(geometry: Geometry, budget: int) -> list[int]:
    """The budget split over the partitions in proportion to their sizes, the newlines getting only
    what the other partitions cannot hold: for methods that drop newlines, so that they still meet
    any budget up to N."""
    sizes = geometry.sizes()
    weights = [0 if name == "newline" else n for name, n in zip(geometry.names, sizes)]
    return allocate(budget, weights, sizes)


def located(geometry: Geometry, parts: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """(M,) long: for each token, the position in `parts` of the partition whose region of the image
    holds the centre of the token's box, -1 for none; a region is the bounding box of its partition's
    token boxes, half-open, so a centre on a border belongs to the partition that starts there."""
    centre = (geometry.boxes[tokens, :2] + geometry.boxes[tokens, 2:]) / 2  # (M, 2) as (x, y)
    where = torch.full((len(tokens),), -1)
    for i, p in enumerate(parts):
        box = geometry.boxes[geometry.members(p)]  # (M_p, 4)
        if len(box):
            inside = ((centre >= box[:, :2].amin(0)) & (centre < box[:, 2:].amax(0))).all(1)
            where[inside & (where < 0)] = i
    return where


def merge_weights(keep: torch.Tensor, n: int, into: torch.Tensor, sources: torch.Tensor, weight: torch.Tensor):
    """(K, N) sparse merge weights (`Selection.weights`): every kept token carries itself, and kept
    token `into[i]` (an index into N) also carries `weight[i]` times token `sources[i]`."""
    rows = torch.cat([torch.arange(len(keep)), torch.searchsorted(keep, into)])
    columns = torch.cat([keep, sources])
    values = torch.cat([torch.ones(len(keep)), weight.float()])
    size = (len(keep), n)
    return torch.sparse_coo_tensor(torch.stack([rows, columns]), values, size, check_invariants=True).coalesce()


def encoder_grid(s: Signals, crops: int, per_crop: int) -> torch.Tensor:
    """(P, T') long: the visual token at each of the T' positions of each of the P crops the encoder saw
    (the thumbnail first, as the padded signals hold them), -1 for padding that unpadding removed;
    crop c is partition c of the geometry (LLaVA-NeXT: "base", then the crops in row-major order)."""
    names = [name for name in s.geometry.names if name != "newline"]
    if len(names) != crops:
        raise ExplorerError(f"the encoder saw {crops} crops, the geometry has {len(names)} partitions of them")
    rows = s[ROWS]  # (N,)
    token = torch.full((crops * per_crop,), -1)
    real = (rows >= 0).cpu()
    token[rows.cpu()[real]] = torch.arange(len(rows))[real]
    return token.view(crops, per_crop)


def real_picks(grid: torch.Tensor, c: int, picks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The visual tokens at positions `picks` of encoder crop c, and how many picks fell on padding."""
    tokens = grid[c, picks]
    return tokens[tokens >= 0], int((tokens < 0).sum())


def dpc_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """(M,) DPC-kNN score of the rows of x (M, D): density exp(-mean squared distance to the k nearest,
    itself included) times the distance to the nearest denser row (the largest distance for the densest),
    distances Euclidean over sqrt(D)."""
    distance = torch.cdist(x, x) / x.shape[1] ** 0.5  # (M, M)
    nearest = distance.topk(min(k, len(x)), dim=1, largest=False).values  # (M, k)
    density = (-(nearest**2).mean(1)).exp()  # (M,)
    denser = density[None, :] > density[:, None]  # (M, M) row i: the rows denser than i
    parent = torch.where(denser, distance, distance.max()).min(1).values  # (M,)
    return parent * density


class Entries(NamedTuple):
    """Merge weights, E entries: kept token `rows[e]` carries `values[e]` times token `columns[e]`."""

    rows: torch.Tensor  # (E,) long
    columns: torch.Tensor  # (E,) long
    values: torch.Tensor  # (E,) float


def sparse_rows(entries: list[Entries], keep: torch.Tensor, n: int) -> torch.Tensor:
    """(K, N) sparse weights (`Selection.weights`) from the entries, summed where they repeat; a kept
    token without entries carries itself."""
    none = torch.zeros(0, dtype=torch.long)
    rows, columns = torch.cat([e.rows for e in entries] + [none]), torch.cat([e.columns for e in entries] + [none])
    values = torch.cat([e.values for e in entries] + [torch.zeros(0)])
    alone = keep[~torch.isin(keep, rows)]
    index = torch.stack([torch.searchsorted(keep, torch.cat([rows, alone])), torch.cat([columns, alone])])
    values = torch.cat([values, torch.ones(len(alone))])
    return torch.sparse_coo_tensor(index, values, (len(keep), n), check_invariants=True).coalesce()
