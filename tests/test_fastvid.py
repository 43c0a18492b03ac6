"""FastVID against its official code: on the same signals of a clip (tiny LLaVA-OneVision, frames of 196
tokens and a newline; tiny Qwen2-VL, temporal groups of 2 frames), given the count the code keeps, it
keeps the code's tokens, each anchor carries the code's merge of the projected features, and every token
joins the code's anchor; and it meets every budget on a clip end to end.

The reference below is our own reading of LunarShen/FastVID a40a109,
fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py (the lines named), not a
copy. It is given the frames' global features we use (the mean of each frame's projected tokens) and the
feature layer's attention, and it leaves out the code's 1e-6 density noise (L979-980), as we do.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from test_qwen_video import clip as qwen_clip
from test_video import write

import backends
from explorer import Signals, make, run
from explorer.core import CLS_FEATURE, FEATURES, fraction_of
from explorer.engine.pipeline import mixed_features, prepare
from explorer.engine.video import load_video

PROMPT = "What happens in this video?"


@functools.cache
def model(name: str):
    return backends.load(name, "cpu")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4", "mpeg4", count=30)


def encoded(name: str, clip):
    """(geometry, signals, (F, T) the token at each place of each frame) of a clip."""
    backend = model(name)
    prepared = prepare(backend, clip, PROMPT)
    with torch.no_grad():
        _, maps = backend.encode(prepared, (FEATURES, CLS_FEATURE))
    g = prepared.geometry
    return g, maps, torch.stack([g.members(p) for p in g.frames])


def fastvid_code(x, attn, glob, r: float, c=8, tau=0.9, d=0.4, p=4, beta=0.6):
    """L900-1068 on a clip's frames: x (F, T, D) the projected tokens, attn (F, T), glob (F, D). Returns
    ({flat place f * T + t: the feature the code feeds the LLM}, {flat place: [the anchors it joined]})."""
    frames, t, dim = x.shape
    unit = glob / glob.norm(dim=1, keepdim=True)  # L913-914
    sim = (unit[:-1] * unit[1:]).sum(1)  # L915
    low = sim.topk(min(c - 1, len(sim)), largest=False).indices  # L917 (the code needs c - 1 <= F - 1)
    cuts = torch.unique(torch.cat([low, (sim < tau).nonzero()[:, 0]])).sort().values  # L918-919
    bounds = F.pad(cuts, (1, 1), value=-1)
    bounds[-1] = frames - 1  # L920-921
    sizes = bounds.diff().tolist()  # L922
    retain = int(t * r)  # L932
    salient = retain - int(retain * d)  # L934
    context = retain - salient  # L938
    counts, offset = torch.zeros(frames, dtype=torch.long), 0  # L937
    for size in sizes:  # L941-952: every p-th frame from a segment's last holds its context tokens
        counts[offset : offset + size][torch.arange(size - 1, -1, -1) % p == 0] = (
            context * size // ((size + p - 1) // p)
        )
        offset += size
    top = attn.topk(salient, dim=1).indices  # L955
    fed = {f * t + int(j): x[f, j] for f in range(frames) for j in top[f]}  # L956-962
    mask = torch.ones(frames, t, dtype=torch.bool).scatter_(1, top, False)  # L965-968
    places = torch.arange(t).expand(frames, -1)[mask].view(frames, t - salient)
    filtered = x[torch.arange(frames)[:, None], places]  # (F, M, D) L970-972
    dist = torch.cdist(filtered.float(), filtered.float()) / dim**0.5  # L975
    density = (-(dist.topk(4, dim=-1, largest=False).values ** 2).mean(-1)).exp()  # L977-978
    denser = (density[:, None, :] > density[:, :, None]).float()  # L982-983
    dmax = dist.flatten(1).max(-1).values[:, None, None]  # L984
    score = (dist * denser + dmax * (1 - denser)).min(-1).values * density  # L985-987
    joins: dict[int, list[int]] = {}
    start = 0
    for size in sizes:
        seg = list(range(start, start + size))
        holders = [f for f in seg if counts[f] == context] if size == 1 else [f for f in seg if counts[f] > context]
        pool = torch.cat([f * t + places[f] for f in seg])  # L1032-1034: the segment's non-salient tokens
        for f in holders if context else []:  # L989-1017 (one frame), L1019-1059 (several); none: no argmax
            anchors = score[f].topk(int(counts[seg[-1]])).indices  # L989 / L1039
            merged = dtm(filtered[seg].reshape(-1, dim), filtered[f, anchors], beta)
            for a, value in zip(anchors.tolist(), merged[0]):
                fed[f * t + int(places[f, a])] = value
            for i, a in zip(pool.tolist(), merged[1].tolist()):
                joins.setdefault(i, []).append(f * t + int(places[f, anchors[a]]))
        start += size
    return fed, joins


def dtm(pool, anchors, beta):
    """L996-1008 / L1044-1056: (the anchors' merged features, the anchor each pool token joined)."""
    unit = pool / pool.norm(dim=-1, keepdim=True)
    joined = (unit @ (anchors / anchors.norm(dim=-1, keepdim=True)).T).argmax(1)  # L999-1001
    one_hot = F.one_hot(joined, len(anchors)).to(pool.dtype)  # (P, A)
    w = (1 / (one_hot.sum(0)[:, None] + 1)).clamp(min=beta)  # L1003
    mean = one_hot.T @ pool / one_hot.sum(0).clamp(min=1)[:, None]  # L1005-1006
    return w * anchors + (1 - w) * mean, joined  # L1008


CASES = {  # model, clip, settings
    "onevision": ("tiny-llava-onevision", "write", {}),
    "onevision, long segments": ("tiny-llava-onevision", "write", {"segments": 3, "threshold": 0.0}),
    "qwen2-vl": ("tiny-qwen2-vl", "drawn", {}),
    "qwen2-vl, one segment": ("tiny-qwen2-vl", "drawn", {"segments": 1, "threshold": -1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("r", [0.25, 0.1])
def test_fastvid_keeps_and_merges_what_the_official_code_does(video, case, r):
    name, source, settings = CASES[case]
    g, maps, places = encoded(name, load_video(video, frames=8) if source == "write" else qwen_clip(8))
    # the tiny projector's features are short (norm ~0.05 over 32 channels), so every float32 density,
    # exp(-mean squared distance / 32), rounds to 1 and the anchors tie; a real model's are far longer
    maps = maps | {FEATURES: maps[FEATURES] * 30}
    features = maps[FEATURES].float()
    x, attn = features[places], maps[CLS_FEATURE].float()[places]  # (F, T, D), (F, T)
    code = {"c": settings.get("segments", 8), "tau": settings.get("threshold", 0.9)}
    fed, joins = fastvid_code(x, attn, x.mean(1), r, **code)
    outside = len(g) - places.numel()  # OneVision's newline, which the code keeps
    selection = make("fastvid", **settings).select(Signals(g, len(fed) + outside, maps))
    flat = places.flatten()
    assert set(selection.keep.tolist()) == {int(flat[i]) for i in fed} | set(range(places.numel(), len(g)))
    mixed = mixed_features(features, selection)
    for i, value in fed.items():
        torch.testing.assert_close(mixed[flat[i]], value, rtol=1e-4, atol=1e-5)
    for i, anchors in joins.items():
        assert int(selection.groups[flat[i]]) in {int(flat[a]) for a in anchors}
        if len(anchors) == 1:
            assert int(selection.groups[flat[i]]) == int(flat[anchors[0]])
    segments = selection.stats["segments"]
    assert sum(segments.values()) == len(places)
    if case.endswith("segments"):  # segments of several frames: their tokens merge across frames
        t = places.shape[1]
        assert max(segments.values()) > 1 and any(a // t != i // t for i, v in joins.items() for a in v)


def test_the_code_drops_a_segment_s_uneven_context_where_we_spend_it(video):
    g, maps, places = encoded("tiny-llava-onevision", load_video(video, frames=8))
    x = maps[FEATURES].float()[places]
    settings = {"segments": 2, "threshold": -1.0}  # one cut: segments of 5 and 3 frames on this clip
    fed, _ = fastvid_code(x, maps[CLS_FEATURE].float()[places], x.mean(1), 0.25, c=2, tau=-1.0)
    selection = make("fastvid", **settings).select(Signals(g, 49 * 8 + 1, maps))
    assert sorted(selection.stats["segments"].values()) == [3, 5]
    assert len(fed) == 49 * 8 - 1  # 19 * 5 context tokens over 2 anchor frames: 47 each, 1 dropped
    assert len(selection.keep) == 49 * 8 + 1


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-qwen2-vl"])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_fastvid_meets_the_budget_on_a_clip_and_by_frame_adds_up(video, name, budget):
    clip = load_video(video, frames=4)
    result = run(model(name), clip, PROMPT, "fastvid", budget, max_new_tokens=1)
    t = result.tokens
    assert t["visual_kept"] == fraction_of(budget, t["visual_full"]) == len(result.selection.keep)
    assert sum(f["full"] for f in t["by_frame"]) == t["visual_full"]
    assert sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"]
    weights = result.selection.weights.to_dense()  # (K, N): every kept token a convex mix
    torch.testing.assert_close(weights.sum(1), torch.ones(len(result.selection.keep)))
    assert result.selection.mixes == "features" and (weights >= 0).all()


@pytest.mark.parametrize("settings", [{}, {"segments": 2, "threshold": -1.0, "step": 2}])
def test_fastvid_meets_any_budget_with_convex_merges(video, settings):
    g, maps, _ = encoded("tiny-llava-onevision", load_video(video, frames=8))
    n = len(g)
    for budget in [1, 2, 50, n // 2, n - 1, n]:
        selection = make("fastvid", **settings).select(Signals(g, budget, maps))
        keep, groups = selection.keep, selection.groups
        assert len(keep) == budget == sum(selection.budgets.values())
        assert (groups[keep] == keep).all() and torch.isin(groups[groups >= 0], keep).all()
        torch.testing.assert_close(selection.weights.to_dense().sum(1), torch.ones(budget))
