"""Budget arithmetic, the methods' shared helpers, and every method on synthetic signals."""

import math
import re

import pytest
import torch
from conftest import toy_geometry

from explorer import METHODS, Budget, ExplorerError, Signals, make
from explorer.core import fraction_of
from explorer.methods import on_images
from explorer.methods.common import allocate, lattice, top
from explorer.methods.tome import bipartite_rounds

# --- budget ---------------------------------------------------------------------------------------


def test_a_fraction_is_taken_in_exact_decimal_arithmetic():
    assert 0.29 * 100 < 29  # the float trap the budget avoids
    assert fraction_of(0.29, 100) == 29
    assert Budget(fraction=0.29).resolve(100) == 29
    assert Budget(fraction=0.2).resolve(2928) == 585
    assert Budget(fraction=1.0).resolve(2928) == 2928
    assert Budget(fraction=0.001).resolve(100) == 1  # never zero tokens
    assert Budget(tokens=7).resolve(10) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": 0.0}, r"fraction in \(0, 1\], got 0.0"),
        ({"fraction": -0.1}, r"fraction in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction in \(0, 1\], got 1.5"),
        ({"fraction": math.nan}, r"fraction in \(0, 1\]"),
        ({"tokens": 0}, "at least 1 token"),
        ({}, "either"),
        ({"fraction": 0.5, "tokens": 3}, "either"),
    ],
)
def test_a_budget_out_of_range_is_refused(kwargs, message):
    with pytest.raises(ExplorerError, match=message):
        Budget(**kwargs)


def test_a_token_budget_above_the_image_is_refused():
    with pytest.raises(ExplorerError, match="11 tokens is more than the 10"):
        Budget(tokens=11).resolve(10)


# --- helpers --------------------------------------------------------------------------------------


def test_allocate_gives_largest_remainders_first():
    assert allocate(10, [4, 3, 1, 0], [16] * 4) == [5, 4, 1, 0]  # 5, 3.75, 1.25, 0


def test_allocate_breaks_ties_towards_the_lower_index():
    assert allocate(3, [1, 1, 1, 1], [9] * 4) == [1, 1, 1, 0]
    assert allocate(10, [2, 2, 2, 2], [9] * 4) == [3, 3, 2, 2]


def test_allocate_caps_shares_and_hands_the_overflow_on():
    # 44 * [4, 3, 1, 0] / 8 = 22, 16.5, 5.5, 0 -> [22, 17, 5, 0]; caps 16: 7 more go to the third
    assert allocate(44, [4, 3, 1, 0], [16] * 4) == [16, 16, 12, 0]


def test_allocate_splits_by_caps_when_every_weight_is_zero():
    assert allocate(5, [0, 0], [10, 30]) == [1, 4]  # 1.25, 3.75
    assert allocate(7, [5, 0, 0], [2, 10, 30]) == [2, 1, 4]  # overflow of 5 goes by size


def test_allocate_never_exceeds_the_caps():
    assert allocate(100, [1, 1], [3, 4]) == [3, 4]
    assert allocate(4, [1, 1], [0, 9]) == [0, 4]


def test_lattice_on_a_24x24_grid_keeps_every_other_cell_of_every_other_row():
    cells = {(int(i) // 24, int(i) % 24) for i in lattice(24, 24, 144)}
    assert cells == {(r, c) for r in range(1, 24, 2) for c in range(1, 24, 2)}


@pytest.mark.parametrize("rows, cols", [(24, 24), (18, 24), (24, 7), (48, 1), (1, 5), (3, 3)])
def test_lattice_gives_exactly_k_distinct_cells_for_every_k(rows, cols):
    for k in range(rows * cols + 1):
        cells = lattice(rows, cols, k)
        assert len(cells) == k == len(set(cells.tolist()))
        assert all(0 <= c < rows * cols for c in cells.tolist())


def test_top_breaks_ties_towards_the_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top(scores, torch.arange(5), 2).tolist() == [1, 2]
    assert top(scores, torch.tensor([0, 3, 4]), 2).tolist() == [4, 3]


# --- every method ---------------------------------------------------------------------------------


SHAPES = {"cls": (), "cls-onehead": (), "cls-logits": (), "keys": (2, 3), "hidden": (6,)}  # per token
SHAPES |= {"prompt-frame": (), "prompt-patch": ()}  # a CLIP model's, beside the VLM (Free Video-LLM)


def random_signals(budget: int, seed: int = 0) -> Signals:
    """Every signal any method asks for, random, NaN for newlines except in the projected features."""
    g = toy_geometry()
    generator = torch.Generator().manual_seed(seed)
    newline = g.partition == g.names.index("newline")
    maps = {"features": torch.randn(len(g), 8, generator=generator)}
    vision = [method for method in METHODS.values() if method.stage == "vision"]
    for name in sorted({name for method in vision for name in method.needs} - {"features"}):
        values = torch.rand(len(g), *SHAPES[name.split("@")[0]], generator=generator)
        maps[name] = values.masked_fill(newline.view(-1, *[1] * (values.dim() - 1)), math.nan)
    first_pass = {  # a first pass through the LLM (GemFilter): the visual tokens among 100 prompt tokens
        "llm-logits": torch.randn(4, 100, generator=generator),
        "llm-positions": torch.arange(len(g)) + 6,
    }
    return Signals(g, budget, maps | merged_in_encoder(g, budget, generator) | first_pass)


def merged_in_encoder(g, budget: int, generator) -> dict:
    """The signals an encoder that merges for tome-vit gives (see `Backend.merged`), made by merging
    random keys of each partition down to its share of the budget."""
    into, after = torch.full((len(g),), math.nan), torch.full((len(g),), math.nan)
    for p, k in enumerate(make("tome-vit").merging(g, budget).budgets):
        members = g.members(p)
        if g.names[p] != "newline":
            owner, when = bipartite_rounds(torch.randn(len(members), 4, generator=generator), max(k, 1))
            into[members] = members[owner].float()
            after[members] = torch.where(when > 0, when - 1.0, math.nan)
    return {"merged into": into, "merged after": after}


@pytest.mark.parametrize("name", [name for name in on_images() if METHODS[name].stage == "vision"])
@pytest.mark.parametrize("budget", [1, 5, 20, 44, 79, 80, 81, 88])
def test_every_method_meets_the_budget_with_sorted_unique_indices(name, budget):
    s = random_signals(budget)
    selection = make(name).select(s)
    keep = selection.keep
    expected = {"none": 88, "hired": min(budget, 80)}.get(name, budget)  # hired drops the 8 newlines
    assert len(keep) == expected
    assert keep.dtype == torch.long and (keep.diff() > 0).all() and 0 <= keep.min() and keep.max() < 88
    assert torch.equal(make(name).select(random_signals(budget)).keep, keep)  # deterministic
    if selection.budgets:
        kept = torch.bincount(s.geometry.partition[keep], minlength=6).tolist()
        assert [selection.budgets[n] for n in s.geometry.names] == kept


def test_random_depends_on_its_seed_only():
    s = random_signals(20)
    assert not torch.equal(make("random", seed=0).select(s).keep, make("random", seed=1).select(s).keep)
    assert torch.equal(make("random", seed=3).select(s).keep, make("random", seed=3).select(random_signals(20, 9)).keep)


def test_pooling_spreads_each_share_evenly_over_its_partition():
    s = random_signals(22)  # sizes 16 x 5 and 8 newlines: 4 tokens per partition, 2 newlines
    selection = make("pooling").select(s)
    assert selection.budgets == {"base": 4, "crop 0,0": 4, "crop 0,1": 4, "crop 1,0": 4, "crop 1,1": 4, "newline": 2}
    g = s.geometry
    base_cells = g.cells[selection.keep[g.partition[selection.keep] == 0]].tolist()
    assert base_cells == [[1, 1], [1, 3], [3, 1], [3, 3]]
    newline_rows = g.cells[selection.keep[g.partition[selection.keep] == 5], 0].tolist()
    assert newline_rows == [2, 6]


def test_cls_keeps_the_top_feature_layer_tokens_of_every_partition():
    s = random_signals(44)
    selection = make("cls").select(s)
    g, score = s.geometry, s["cls@feature"]
    for p, name in enumerate(g.names[:-1]):
        members = g.members(p)
        kept = selection.keep[g.partition[selection.keep] == p]
        dropped = members[~torch.isin(members, kept)]
        assert len(kept) == selection.budgets[name]
        assert score[kept].min() > score[dropped].max()


# --- HiRED, hand-computed -------------------------------------------------------------------------


def hired_signals(budget: int, content: list[tuple[int, int]]) -> Signals:
    """Layer 0 marks the given thumbnail cells as content (scores 1 > 0.5 > the rest, in raster order);
    at the feature layer earlier tokens score higher, so every partition keeps its first tokens."""
    g = toy_geometry()
    first = torch.linspace(0.4, 0.1, len(g))
    for r, c in content:
        first[4 * r + c] = 1.0
    feature = torch.linspace(1.0, 0.0, len(g))
    newline = g.partition == 5
    maps = {"cls@0": first.masked_fill(newline, math.nan), "cls@feature": feature.masked_fill(newline, math.nan)}
    return Signals(g, budget, maps)


SPREAD = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 0)]  # 4 in crop 0,0; 3 in 0,1; 1 in 1,0
LEFT_HALF = [(r, c) for r in range(4) for c in range(2)]  # 4 in crop 0,0 and 4 in crop 1,0


def budgets_of(selection) -> list[int]:
    return [selection.budgets[n] for n in ("base", "crop 0,0", "crop 0,1", "crop 1,0", "crop 1,1", "newline")]


@pytest.mark.parametrize(
    "budget, alpha, content, counts, budgets",
    [
        # base min(floor(0.5 * 20), 16) = 10; crops share 10 as 4:3:1:0 -> 5, 3.75, 1.25, 0 -> 5, 4, 1, 0
        (20, 0.5, SPREAD, [4, 3, 1, 0], [10, 5, 4, 1, 0, 0]),
        # base min(30, 16) = 16; crops 44 -> 22, 17, 5, 0 capped at 16, overflow to the third
        (60, 0.5, SPREAD, [4, 3, 1, 0], [16, 16, 16, 12, 0, 0]),
        # alpha = 1: no content tokens at all, so the 4 crop tokens are split by crop size
        (20, 1.0, SPREAD, [0, 0, 0, 0], [16, 1, 1, 1, 1, 0]),
        # base floor(7.8) = 7; crops can hold only 64 of 71, the 7 left go back to the thumbnail
        (78, 0.1, SPREAD, None, [14, 16, 16, 16, 16, 0]),
        (20, 0.5, LEFT_HALF, [4, 0, 4, 0], [10, 5, 0, 5, 0, 0]),
    ],
)
def test_hired_allocation_by_hand(budget, alpha, content, counts, budgets):
    s = hired_signals(budget, content)
    selection = make("hired", alpha=alpha).select(s)
    if counts is not None:
        assert list(selection.stats["content count"].values()) == counts
    assert budgets_of(selection) == budgets
    g = s.geometry
    expected = torch.cat([g.members(p)[:k] for p, k in enumerate(budgets)]).sort().values  # first = top here
    assert torch.equal(selection.keep, expected)


def on_the_encoder_grid(s: Signals) -> Signals:
    """`s` with what paper_code settings read: the toy's five 4x4 partitions as the encoder's crops
    (no padding), "encoder rows" and the [CLS] attention at every position."""
    g = s.geometry
    rows = torch.full((len(g),), -1)
    for p in range(5):
        rows[g.members(p)] = 16 * p + torch.arange(16)  # each partition's tokens walk its grid in raster order
    grid = torch.stack([s["cls@feature"][g.members(p)] for p in range(5)])  # (5, 16)
    return Signals(g, s.budget, s.maps | {"encoder rows": rows, "padded cls@feature": grid})


def test_hired_paper_code_counts_row_stripes_of_the_thumbnail():
    # one stripe of thumbnail rows per crop: rows 0, 1, 2, 3 -> crops 0,0 / 0,1 / 1,0 / 1,1
    selection = make("hired", paper_code=True).select(on_the_encoder_grid(hired_signals(20, LEFT_HALF)))
    assert list(selection.stats["content count"].values()) == [2, 2, 2, 2]
    # thumbnail int(0.5 * 20) = 10; each crop int(2 / 8 * 10) = 2, the remainders lost
    assert budgets_of(selection) == [10, 2, 2, 2, 2, 0] and len(selection.keep) == 18


def test_hired_counts_a_centre_on_a_crop_border_in_the_crop_that_starts_there():
    s = hired_signals(20, [(0, 0)])
    s.geometry.boxes[0] = torch.tensor([30.0, 0.0, 50.0, 20.0])  # centre x = 40: crop 0,1 starts at 40
    selection = make("hired", alpha=15 / 16).select(s)  # floor(1/16 * 16) = 1 content token
    assert list(selection.stats["content count"].values()) == [0, 1, 0, 0]


def test_hired_teaches_its_content_map():
    s = hired_signals(20, SPREAD)
    selection = make("hired").select(s)
    content = selection.maps["content"]
    assert torch.equal(content[:16], s["cls@0"][:16]) and content[16:].isnan().all()
    top = selection.maps["content top"]
    assert (top == 1).nonzero()[:, 0].tolist() == sorted(4 * r + c for r, c in SPREAD)
    assert (top[:16] >= 0).all() and top[16:].isnan().all()  # the thumbnail only
    torch.testing.assert_close(selection.scores, s["cls@feature"], equal_nan=True)


@pytest.mark.parametrize(
    "name, settings, message",
    [
        (
            "nope",
            {},
            "unknown method 'nope'; choose one of: none, random, uniform, pooling, cls, vtc-cls, hired, visionzip, prumerge+, "
            "globalcom2, divprune, vispruner, tome, tome-vit, transprune",
        ),
        ("hired", {"alpha": 1.5}, "alpha must be between 0.0 and 1.0, got 1.5"),
        ("hired", {"alpha": math.nan}, "alpha must be between"),
        ("hired", {"alpha": "high"}, "alpha must be a number"),
        ("hired", {"paper_code": 1}, "paper_code must be true or false"),
        ("hired", {"beta": 1.0}, "hired has no setting 'beta'; its settings: alpha, paper_code"),
        ("random", {"seed": 0.5}, "seed must be an integer"),
        ("cls", {"alpha": 0.5}, "its settings: none"),
    ],
)
def test_unknown_methods_and_bad_settings_are_refused(name, settings, message):
    with pytest.raises(ExplorerError, match=re.escape(message)):
        make(name, **settings)
