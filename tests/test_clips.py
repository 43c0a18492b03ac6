"""Image methods on a clip, frame by frame, and the `frames` baseline, on a synthetic clip geometry:
budgets met exactly, each frame's share, merge groups and weights in the clip's indices, `by_frame`."""

import pytest
import torch

from explorer.core import CLS_FEATURE, FEATURES, HIDDEN_FEATURE, KEYS_FEATURE, Geometry, Signals
from explorer.engine.clips import by_frame, frames_of, per_frame
from explorer.engine.pipeline import choose
from explorer.engine.video import Clip
from explorer.methods import make
from explorer.methods.common import patches_first

FRAMES, ROWS, COLS = 6, 3, 4  # six frames of 3x4 tokens, then one newline (as OneVision closes a clip)


def clip_geometry() -> Geometry:
    per = ROWS * COLS
    cells = torch.tensor([(r, c) for r in range(ROWS) for c in range(COLS)] * FRAMES + [(0, 0)])
    boxes = torch.tensor([(c * 10.0, r * 10.0, c * 10.0 + 10, r * 10.0 + 10) for r, c in cells[:-1].tolist()])
    boxes = torch.cat([boxes, torch.full((1, 4), torch.nan)])
    partition = torch.cat([torch.arange(FRAMES).repeat_interleave(per), torch.tensor([FRAMES])])
    names = tuple(f"frame {f}" for f in range(FRAMES)) + ("newline",)
    return Geometry(names, partition, cells, boxes, (COLS * 10, ROWS * 10))


def image_geometry() -> Geometry:
    return Geometry(
        ("base",), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 4), (2, 2)
    )


def signals(g: Geometry, budget: int, seed: int = 0) -> Signals:
    generator = torch.Generator().manual_seed(seed)
    n = len(g)
    maps = {
        CLS_FEATURE: torch.rand(n, generator=generator),
        KEYS_FEATURE: torch.randn(n, 8, generator=generator),
        HIDDEN_FEATURE: torch.randn(n, 8, generator=generator),
        FEATURES: torch.randn(n, 8, generator=generator),
    }
    maps[CLS_FEATURE][-1] = torch.nan  # the newline has no attention
    return Signals(g, budget, maps)


def test_frames_are_read_off_the_partition_names():
    assert frames_of("frame 3") == [3] and frames_of("frames 2-3") == [2, 3] and frames_of("newline") == []
    assert clip_geometry().frames == list(range(FRAMES)) and image_geometry().frames == []


@pytest.mark.parametrize("method", ["random", "uniform", "cls", "divprune", "visionzip", "pooling"])
@pytest.mark.parametrize("budget", [1, 7, 20, 36, 72, 73])
def test_an_image_method_runs_frame_by_frame_and_meets_the_clip_s_budget(method, budget):
    g = clip_geometry()
    chosen = make(method)
    picked = choose(chosen, signals(g, budget))
    shares = patches_first(g, budget)  # frames in proportion to their tokens, the newline only past them
    kept = torch.bincount(g.partition[picked.keep], minlength=len(g.names)).tolist()
    assert len(picked.keep) == budget and kept == shares, (kept, shares)
    assert (picked.keep.diff() > 0).all()
    if picked.groups is not None:  # merge groups point at kept tokens of the same frame, in the clip's indices
        merged = (picked.groups >= 0).nonzero()[:, 0]
        assert set(picked.groups[merged].tolist()) <= set(picked.keep.tolist())
        assert (g.partition[merged] == g.partition[picked.groups[merged]]).all()
    if picked.weights is not None:  # every kept token carries something, itself at least
        assert picked.weights.shape == (budget, len(g))
        assert (picked.weights.to_dense().sum(1) > 0).all()
        assert torch.equal(picked.groups[picked.keep], picked.keep)


def test_a_frame_sees_only_its_own_tokens():
    g, seen = clip_geometry(), []

    def select(s: Signals):
        seen.append((s.geometry.names, len(s.geometry), s.budget, s.maps[CLS_FEATURE].clone()))
        return make("cls").select(s)

    everything = signals(g, 24)
    per_frame(select, everything)
    assert [names for names, *_ in seen] == [(f"frame {f}",) for f in range(FRAMES)]
    assert all(n == ROWS * COLS and b == 4 for _, n, b, _ in seen)
    for f, (*_, scores) in enumerate(seen):
        assert torch.equal(scores, everything.maps[CLS_FEATURE][f * 12 : (f + 1) * 12])


@pytest.mark.parametrize("budget, whole, rest", [(12, 1, 0), (30, 2, 6), (5, 0, 5), (72, 6, 0), (73, 6, 0)])
def test_the_frames_baseline_keeps_whole_frames_evenly_spaced_and_the_rest_from_one_more(budget, whole, rest):
    g = clip_geometry()
    keep = choose(make("frames"), signals(g, budget)).keep
    kept = torch.bincount(g.partition[keep], minlength=len(g.names)).tolist()
    assert len(keep) == budget
    assert sorted(kept[:FRAMES], reverse=True)[: whole + (rest > 0)] == [12] * whole + ([rest] if rest else [])
    frames = [f for f in range(FRAMES) if kept[f]]
    if len(frames) > 1:  # evenly spaced: gaps differ by at most one frame
        gaps = [b - a for a, b in zip(frames, frames[1:])]
        assert max(gaps) - min(gaps) <= 1
    assert kept[FRAMES] == (budget > 72)  # the newline only past every frame's tokens


def test_the_frames_baseline_refuses_an_image():
    from explorer import ExplorerError
    from explorer.engine.pipeline import plan_for

    class Image:
        geometry = image_geometry()

    with pytest.raises(ExplorerError, match="works on the frames of a video"):
        plan_for(None, Image, make("frames"), None)


def test_by_frame_adds_up_to_the_clip_s_counts():
    g = clip_geometry()
    keep = choose(make("cls"), signals(g, 30)).keep
    clip = Clip([], [10 * f for f in range(FRAMES)], [0.5 * f for f in range(FRAMES)], 20.0, 3.0, False)
    rows = by_frame(g, keep, clip)
    assert [r["frames"] for r in rows] == [[10 * f] for f in range(FRAMES)]
    assert [r["time_s"] for r in rows] == [0.5 * f for f in range(FRAMES)]
    assert sum(r["full"] for r in rows) == len(g) and sum(r["kept"] for r in rows) == len(keep)
    assert rows[-1]["full"] == ROWS * COLS + 1  # the newline counts with the last frame
