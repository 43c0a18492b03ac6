"""The Video tab's steps of a method on the visitor's clip (explorer/views/clip_steps.py, issue 26): the
segments under the frame strip, each frame's budget and facts, the merge groups across frames, DyCoke's
decode-time cut against the KV cache, and the stage bars, on real runs of tiny-llava-onevision with a clip
of 6 frames of 196 tokens and a newline."""

import html
import re
from dataclasses import dataclass

import pytest
import torch

import ui.video
from backends.signals import FEATURES
from explorer.engine.video import load_video
from explorer.methods import METHODS
from explorer.methods.dycoke import DyCoke, references
from explorer.methods.fastvid import dyseg
from explorer.methods.vidcom2 import similarities
from explorer.views.clip import clip_pass

FRAMES = 6
RUN = dict(frames=FRAMES, prompt="What moves?", max_new_tokens=4)


@pytest.fixture(scope="module")
def features(clip_session, clip_file):
    """The clip's geometry and projected features, (N, D), from one vision pass of its frames."""
    seen = clip_pass(clip_session.backend(), load_video(clip_file, frames=FRAMES), (FEATURES,))
    return seen.geometry, seen.maps[FEATURES].float().cpu()


def bands(strip: str) -> list[str]:
    """The labels of the segment bands under the strip's frames, one per frame ("" after a segment's first)."""
    return re.findall(r'<div class="clip-band"[^>]*>([^<]*)</div>', strip)


def facts(strip: str) -> list[str]:
    return re.findall(r"<span class=clip-facts>([^<]*)</span>", strip)


def test_fastvid_s_segments_are_drawn_under_the_strip_as_dyseg_cuts_the_clip(clip_session, clip_file, features):
    g, x = features
    settings = dict(fastvid_segments=3, fastvid_threshold=-1.0)  # only the 2 least alike transitions cut
    last = list(ui.video.run(clip_session, {}, 0, clip=clip_file, method="fastvid", budget=30, compare=False, **RUN,
                             **settings))[-1]  # fmt: skip
    want = dyseg([x[g.members(p)].mean(0) for p in g.frames], 3, -1.0)  # the frames of each segment
    assert len(want) == 3
    labels = []
    for i, frames in enumerate(want):
        a, b = frames[0], frames[-1]
        labels += [f"segment {i}: frame {a}" if a == b else f"segment {i}: frames {a}-{b}"] + [""] * (b - a)
    assert bands(last["strip"]) == labels
    assert "It cut the clip into 3 segments (" in last["steps"]
    groups = last["shown"]["selection"].groups
    assert f"{int(((groups >= 0) & (groups != torch.arange(len(g)))).sum())} tokens merged into" in last["steps"]


def test_holitom_s_windows_and_its_merge_groups_across_frames_are_what_it_merged(clip_session, clip_file):
    out = ui.video.live(clip_session, 0, clip=clip_file, frames=FRAMES, method="holitom", budget=25)
    g, selection = out["shown"]["geometry"], out["shown"]["selection"]
    window = selection.maps["HoliTom window"]
    drawn = [label for label in bands(out["strip"]) if label]
    want = []
    for i in range(int(window.nan_to_num(-1).max()) + 1):
        frames = [f for f, p in enumerate(g.frames) if int(window[g.members(p)][0]) == i]
        want.append(
            f"window {i}: frame {frames[0]}" if len(frames) == 1 else f"window {i}: frames {frames[0]}-{frames[-1]}"
        )
    assert drawn == want and len(bands(out["strip"])) == FRAMES
    frame_of = {int(t): f for f, p in enumerate(g.frames) for t in g.members(p)}  # token -> its frame
    spans = {}
    for token, target in enumerate(selection.groups.tolist()):
        if target >= 0 and token in frame_of:
            spans.setdefault(target, set()).add(frame_of[token])
    merged = [t for t, target in enumerate(selection.groups.tolist()) if target >= 0 and target != t]
    took = {selection.groups[t].item() for t in merged}  # the kept tokens that took others in
    several = [t for t in took if len(spans[t]) > 1]
    assert f"{len(merged)} tokens merged into {len(took)} kept tokens" in out["steps"]
    widest = f" (the widest, {max(len(spans[t]) for t in several)} frames)" if several else ""
    assert f"Spanning more than one frame: {len(several)} of {len(took)}{widest}." in out["steps"]


def test_vidcom2_s_budget_and_uniqueness_are_beside_each_frame_s_kept_count(clip_session, clip_file, features):
    g, x = features
    out = ui.video.live(clip_session, 0, clip=clip_file, frames=FRAMES, method="vidcom2", budget=30)
    video, _ = similarities(x[g.frame_grid().flatten()], FRAMES)
    uniqueness = (-video.mean(1)).tolist()  # (F,) the method's step 3, on the same features
    budgets = out["shown"]["selection"].budgets
    kept = re.findall(r"<b>(\d+)</b> of 196 kept", out["strip"])
    said = facts(out["strip"])
    for f, p in enumerate(g.frames):
        assert said[f] == f"budget {budgets[g.names[p]]} · uniqueness {uniqueness[f]:.3g}"
        assert int(kept[f]) == budgets[g.names[p]]
    most = max(range(FRAMES), key=uniqueness.__getitem__)
    assert f"least like the clip's average, frame {most} (uniqueness" in html.unescape(out["steps"])
    assert bands(out["strip"]) == []  # no segments


def test_dycoke_s_windows_and_its_compared_frames_are_said(clip_session, clip_file):
    out = ui.video.live(clip_session, 0, clip=clip_file, frames=FRAMES, method="dycoke", budget=60)
    assert [label for label in bands(out["strip"]) if label] == ["window 0: frames 0-3", "window 1: frames 4-5"]
    pairs = ", ".join(f"frame {f} against frame {r}" for f, r in sorted(references(FRAMES).items()))
    assert f"TTM compared 4 frames with a reference frame ({pairs})" in out["steps"]
    compared = 706 - 2 * 196 - 1  # 60% of 1177, less frames 0 and 4 whole and the newline
    assert f"at the same place there, {compared} of their 784; the other 2 frames stayed whole." in out["steps"]


@dataclass(frozen=True)
class Recorded(DyCoke):
    """DyCoke, noting what its decode stage chose at each step: the count of visual tokens it returned
    (None: every token still in the sequence)."""

    def attended(self, s, previous):
        keep = super().attended(s, previous)
        CHOSEN.append(int(s.alive.sum()) if keep is None else len(keep))
        return keep


CHOSEN: list[int] = []


def test_dycoke_s_decode_chart_counts_what_its_decode_stage_chose_against_the_cache(
    clip_session, clip_file, monkeypatch
):
    monkeypatch.setitem(METHODS, "dycoke-recorded", Recorded)
    CHOSEN.clear()
    given = dict(clip=clip_file, method="dycoke-recorded", budget=40, compare=False, **{**RUN, "max_new_tokens": 6})
    last = list(ui.video.run(clip_session, {}, 0, **given))[-1]
    held, attended = last["decode"].data
    kept = int(re.search(r"(\d+) of \d+ visual tokens kept", last["count"]).group(1))
    assert list(attended.y) == CHOSEN and len(CHOSEN) == 5  # one per decode step after the first token
    assert list(held.y) == [kept] * 5 and CHOSEN[0] < kept  # the cache holds every token; the first step cuts
    cut = [n for n in CHOSEN if n < kept]
    assert f"at {len(cut)} of 5 steps the LLM" in last["steps"] and f"of the {kept} visual tokens" in last["steps"]


def test_the_video_tab_shows_where_the_time_goes_for_both_runs(clip_session, clip_file):
    last = list(ui.video.run(clip_session, {}, 0, clip=clip_file, method="evs", budget=30, **RUN))[-1]
    assert last["stages"].startswith("<b>Where the time goes</b><svg")
    assert ">reduced</text>" in last["stages"] and ">full</text>" in last["stages"]
    assert "of its time to first token in the vision encoder" in html.unescape(last["stages"])  # the sentence
    assert last["decode"] is None  # no decode-time cut
    change = last["shown"]["selection"].stats["mean change"]
    assert list(change) == [f"frame {f}" for f in range(1, FRAMES)]
    assert [s.split(" · ")[-1] for s in facts(last["strip"])[1:]] == [f"mean change {c:.3g}" for c in change.values()]


def test_a_segment_of_temporal_groups_is_labelled_with_the_clip_s_frames_and_each_frame_with_its_facts():
    """On Qwen2-VL a partition is a group of 2 frames: segment labels count the clip's frames, not groups."""
    from explorer.core import Geometry, Selection
    from explorer.views import clip_steps

    names = ("frames 0-1", "frames 2-3", "frames 4-5", "newline")
    partition = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # 2 tokens a group, then a newline
    g = Geometry(names, partition, torch.zeros(7, 2, dtype=torch.long), torch.zeros(7, 4), (64, 32))
    stats = {"segment": {"frames 0-1": 0, "frames 2-3": 0, "frames 4-5": 1}, "uniqueness": {"frames 2-3": 0.5}}
    selection = Selection(keep=torch.tensor([0, 2, 4, 6]), budgets={"frames 0-1": 1}, stats=stats)
    runs = clip_steps.segments(g, selection)
    assert [r.label("window") for r in runs] == ["window 0: frames 0-3", "window 1: frames 4-5"]
    assert [(r.first, r.last) for r in runs] == [(0, 1), (2, 2)]
    assert [clip_steps.facts(g, selection, p) for p in g.frames] == ["budget 1", "uniqueness 0.5", ""]
    drawn = clip_steps.bands(g, selection, "window")
    assert [re.sub("<[^>]+>", "", band) for band in drawn] == ["window 0: frames 0-3", "", "window 1: frames 4-5"]
    opening = [band.split(">")[0] for band in drawn]  # the band's colour and title
    assert opening[0] == opening[1] != opening[2]
    alone = clip_steps.merge_words(g, Selection(keep=selection.keep, groups=torch.tensor([0, 0, 2, 2, 4, 4, 6])))
    assert alone.startswith("Merge groups: 3 tokens merged into 3 kept tokens") and alone.endswith("frame: 0 of 3.")
    across = clip_steps.merge_words(g, Selection(keep=selection.keep, groups=torch.tensor([0, 0, 0, 0, 4, 4, 6])))
    assert "4 tokens merged into 2 kept tokens" in across and across.endswith("frame: 1 of 2 (the widest, 2 frames).")
