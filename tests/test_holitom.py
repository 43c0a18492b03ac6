"""HoliTom against its official code: on the same signals of a clip (tiny LLaVA-OneVision, frames of 196
tokens and a newline; tiny Qwen2-VL, temporal groups of 2 frames), given the count the code keeps, it
finds the code's windows, keeps the code's tokens, each kept token carries the code's merge of the
projected features, and every merged token joins the code's centre; and it meets every budget on a clip
end to end. Inside the LLM, at layer k, it prunes the tokens the code prunes and merges each where the code
does (holitom/modeling_qwen2.py), on synthetic signals and on two clips, where the layers from k on run
on the code's merged, shorter sequence.

The reference below is our own reading of cokeshao/HoliTom e9b2972, holitom/llava_arch.py (the lines
named), not a copy, with the environment's defaults (BETA=0.6, D=0, K=7, MAX_WINDOW_SIZE=1024, NO_BETA
unset: llava_arch.py L137 then mixes with beta); it leaves out the code's 1e-6 density noise (L39-40), as
we do. It is given the feature layer's attention, as the code takes it (mean over heads and queries).
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_geometry
from test_qwen_video import clip as qwen_clip
from test_video import write

import backends
from explorer import ExplorerError, Signals, make, run
from explorer.core import CLS_FEATURE, FEATURES, Budget, fraction_of
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


def static_windows_code(sim, n: int, tau: float, max_window: int = 1024):
    """select_static_windows, L53-98: ([(first, last) frame of each window], tokens merged away)."""
    count = torch.ones(n, n, sim.shape[1])  # L56
    for start in range(n - 1):  # L58-60
        cum = torch.cumprod(sim[start:] > tau, dim=0)
        count[start, start + 1 : start + 1 + len(cum)] = cum.float()
    lengths = (torch.arange(n)[None] - torch.arange(n)[:, None]).clamp(min=0)  # L62-64
    pruned = count.sum(-1) * lengths  # L66
    dp, prev = torch.zeros(n), torch.zeros(n, dtype=torch.long)
    for i in range(n):  # L75-87
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + pruned[j + 1, i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], n - 1
    while i >= 0:  # L89-95
        windows.append((int(prev[i]), i))
        i = int(prev[i]) - 1
    return windows[::-1], float(dp[-1])


def dpc_code(x, centres: int, k: int):
    """cluster_dpc_knn, L29-51, on one sequence x (M, D): (the centres, sorted as L176 / L204 sort them,
    the distances)."""
    dist = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5  # L33
    density = (-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(-1)).exp()  # L36-37
    mask = (density[None, :] > density[:, None]).float()  # L43
    score = (dist * mask + dist.max() * (1 - mask)).min(-1).values * density  # L44-48
    return score.topk(centres).indices.sort().values, dist  # L49


def clustering_code(x, centres, dist, beta: float):
    """merge_tokens_by_clustering, L100-150: ([the centres' values], (M,) the centre (a row) each row joined,
    -1 for the centres)."""
    others = (~torch.isin(torch.arange(len(x)), centres)).nonzero()[:, 0]  # L102-107
    nearest = dist[others][:, centres].argmin(-1)  # L116-127
    joined = torch.full((len(x),), -1)
    joined[others] = centres[nearest]
    values = []
    for i, c in enumerate(centres.tolist()):  # L129-146
        members = x[others[nearest == i]]
        values.append(beta * x[c] + (1 - beta) * members.mean(0) if len(members) else x[c])
    return values, joined


def holitom_code(x, attn, r: float, tau: float, d=0.0, beta=0.6, k=7):
    """prepare_inputs_labels_for_multimodal, L370-407, on a clip's pooled projected tokens x (F, T, D) and
    attention (F, T). Returns ({flat place f * T + t: the feature the code feeds the LLM at it (a window's
    static token at its first frame)}, {flat place: the flat place it merged into}, the windows)."""
    frames, t, _ = x.shape
    unit = F.normalize(x, p=2, dim=-1)  # L377
    sim = F.cosine_similarity(unit[:-1], unit[1:], dim=-1)  # L378-380
    windows, reduced = static_windows_code(sim, frames, tau)  # L382-384
    ratio = min(r / ((frames * t - reduced) / (frames * t)), 1)  # L388-390
    fed, joins = {}, {}
    for start, end in windows:  # get_static_dynamic_features, L283-309; holitom, L234-275
        static = (sim[start:end] > tau).all(0) if end > start else torch.zeros(t, dtype=torch.bool)  # L295-297
        where = static.nonzero()[:, 0]
        kept = round(len(where) * ratio)  # merge_tokens_by_density, L199-213
        if end > start and kept > 0:
            mean = x[start : end + 1, static].mean(0)  # L298, L303
            centres, dist = dpc_code(mean, kept, min(k, kept))
            values, joined = clustering_code(mean, centres, dist, beta)
            fed |= {start * t + int(where[c]): v for c, v in zip(centres.tolist(), values)}
            for f in range(start, end + 1):  # every frame's token at a static place: one token, or joined
                joins |= {f * t + int(where[m]): start * t + int(where[c]) for m, c in enumerate(joined.tolist())}
                joins |= {f * t + int(where[c]): start * t + int(where[c]) for c in centres.tolist()}
        for f in range(start, end + 1):  # merge_tokens_by_attention_density, L152-197
            where = (~static).nonzero()[:, 0]
            keep = math.ceil(len(where) * ratio)  # L154-155
            dominant = round(keep * (1 - d))
            top = attn[f, where].topk(dominant).indices  # L159
            fed |= {f * t + int(where[i]): x[f, where[i]] for i in top.tolist()}
            rest = where[~torch.isin(torch.arange(len(where)), top)]  # L173-174
            if keep - dominant > 0:
                centres, dist = dpc_code(x[f, rest], keep - dominant, min(k, keep - dominant))  # L175-176
                values, joined = clustering_code(x[f, rest], centres, dist, beta)
                fed |= {f * t + int(rest[c]): v for c, v in zip(centres.tolist(), values)}
                joins |= {f * t + int(rest[m]): f * t + int(rest[c]) for m, c in enumerate(joined.tolist()) if c >= 0}
    return fed, joins, windows


VISION = {"merge_ratio": 0.0}  # nothing merged inside the LLM: the step before it keeps the budget
CASES = {  # model, clip, settings
    "onevision": ("tiny-llava-onevision", "write", {}),
    "onevision, contextual": ("tiny-llava-onevision", "write", {"contextual": 0.4}),
    "qwen2-vl": ("tiny-qwen2-vl", "drawn", {"threshold": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("r", [0.25, 0.1])
def test_holitom_keeps_and_merges_what_the_official_code_does(video, case, r):
    name, source, settings = CASES[case]
    g, maps, places = encoded(name, load_video(video, frames=8) if source == "write" else qwen_clip(8))
    features = maps[FEATURES].float()
    x, attn = features[places], maps[CLS_FEATURE].float()[places]  # (F, T, D), (F, T)
    tau = settings.get("threshold", 0.8)
    fed, joins, windows = holitom_code(x, attn, r, tau, d=settings.get("contextual", 0.0))
    outside = len(g) - places.numel()  # OneVision's newline, which the code keeps
    selection = make("holitom", **settings, **VISION).select_vision(Signals(g, len(fed) + outside, maps))
    assert list(selection.stats["windows"].values()) == [b - a + 1 for a, b in windows]
    flat = places.flatten()
    assert set(selection.keep.tolist()) == {int(flat[i]) for i in fed} | set(range(places.numel(), len(g)))
    mixed = mixed_features(features, selection)
    for i, value in fed.items():
        torch.testing.assert_close(mixed[flat[i]], value, rtol=1e-4, atol=1e-5)
    for i, into in joins.items():
        assert int(selection.groups[flat[i]]) == int(flat[into])
    assert max(b - a for a, b in windows) > 0  # some window spans frames: static tokens merge over time


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-qwen2-vl"])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_holitom_meets_the_budget_on_a_clip_and_by_frame_adds_up(video, name, budget):
    clip = load_video(video, frames=4)
    result = run(model(name), clip, PROMPT, "holitom", budget, settings=VISION, max_new_tokens=1)
    t = result.tokens
    assert t["visual_kept"] == fraction_of(budget, t["visual_full"]) == len(result.selection.keep)
    assert t["visual_entering"] == t["visual_kept"] == t["visual_layer_mean"]  # w/o M: the LLM keeps them all
    assert sum(f["full"] for f in t["by_frame"]) == t["visual_full"]
    assert sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"]


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-qwen2-vl"])
def test_holitom_with_its_merge_inside_the_llm_meets_the_layer_mean_budget(video, name):
    clip, depth = load_video(video, frames=4), model(name).depth
    result = run(model(name), clip, PROMPT, "holitom", 0.25, max_new_tokens=1)
    t, m = result.tokens, result.tokens["visual_entering"]
    b, k = fraction_of(0.25, t["visual_full"]), 18 * depth // 28
    assert t["llm_cuts"] == [{"layer": k, "scored_at": k - 1, "kept": round(m / 2)}]  # r = 0.5, as the code
    assert t["visual_per_layer"] == [m] * k + [round(m / 2)] * (depth - k)
    assert t["visual_layer_mean"] <= b < (k * (m + 2) + (depth - k) * (round(m / 2) + 1)) / depth  # the most that fit
    assert sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"] == len(result.selection.keep) == round(m / 2)
    with pytest.raises(ExplorerError, match="raise the budget, or set budget_after_cuts"):
        run(model(name), clip, PROMPT, "holitom", Budget(tokens=1), max_new_tokens=1)  # 2 enter: a mean over 1


@pytest.mark.parametrize("settings", [{}, {"contextual": 0.5}])
def test_holitom_meets_any_budget_with_convex_merges(video, settings):
    g, maps, _ = encoded("tiny-llava-onevision", load_video(video, frames=8))
    n = len(g)
    for budget in [1, 2, 50, n // 2, n - 1, n]:
        selection = make("holitom", **settings, **VISION).select_vision(Signals(g, budget, maps))
        keep, groups = selection.keep, selection.groups
        assert len(keep) == budget == sum(selection.budgets.values())
        assert (groups[keep] == keep).all() and torch.isin(groups[groups >= 0], keep).all()
        torch.testing.assert_close(selection.weights.to_dense().sum(1), torch.ones(budget))


# --- inside the LLM: holitom/modeling_qwen2.py -----------------------------------------------------


def merge_code(hidden: torch.Tensor, attention: torch.Tensor, r: float):
    """Qwen2Model_holitom.forward at layer HOLITOM_k, holitom/modeling_qwen2.py L146-197, on the M visual
    tokens of one sequence: hidden (M, D) entering layer k, attention (M,) the last token's at layer k - 1,
    heads averaged (L148-156). Returns (the kept tokens, sorted (L185-197), their hidden states after the
    merge, {merged token: the kept token it joined})."""
    m = len(attention)
    top = attention.topk(round(m * (1 - r))).indices  # L158-160
    others = torch.arange(m)[~torch.isin(torch.arange(m), top)]  # L166-168
    norms = hidden.norm(dim=-1)
    similarity = hidden[others] @ hidden[top].T / (norms[others, None] * norms[None, top])  # L169-174
    best = top[similarity.max(-1).indices]  # L175, L180
    merged = hidden.clone()
    for o, into in zip(others.tolist(), best.tolist()):  # L177-181: one after another, each the mean of the two
        merged[into] = (merged[into] + merged[o]) / 2
    keep = top.sort().values
    return keep, merged[keep], dict(zip(others.tolist(), best.tolist()))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("r", [0.5, 0.3])
def test_holitom_merges_at_layer_k_what_the_official_code_merges(seed, r):
    generator = torch.Generator().manual_seed(seed)
    n = 88  # visual tokens (of the toy geometry); 45 alive at the cut (the others gone before the LLM: NaN)
    alive = torch.randperm(n, generator=generator)[:45].sort().values
    hidden = torch.full((n, 16), torch.nan)
    hidden[alive] = torch.randn(45, 16, generator=generator)
    attention = torch.full((2, 3, n), torch.nan)  # (H, T, N)
    attention[..., alive] = torch.rand(2, 3, 45, generator=generator)
    keep, merged, joins = merge_code(hidden[alive], attention[:, -1, alive].mean(0), r)
    maps = {"llm-attention": attention, "llm-residual": hidden}
    s = Signals(toy_geometry(), round(45 * (1 - r)), maps, torch.isin(torch.arange(n), alive))
    selection = make("holitom", merge_ratio=r).select(s)
    assert selection.keep.tolist() == alive[keep].tolist() and selection.mixes == "llm-residual"
    assert {int(alive[o]): int(alive[into]) for o, into in joins.items()} == {
        t: int(selection.groups[t]) for t in alive.tolist() if t not in selection.keep
    }
    mixed = selection.weights.to_dense() @ hidden.nan_to_num()  # (K, D): what enters layer k
    torch.testing.assert_close(mixed, merged, rtol=1e-5, atol=1e-6)
    assert (selection.groups[~torch.isin(torch.arange(n), alive)] == -1).all()


@pytest.mark.parametrize("frames, prompt", [(4, PROMPT), (6, "Which colour moves, and where to?")])
def test_holitom_the_llm_runs_on_the_official_merge_after_layer_k(video, frames, prompt):
    backend = model("tiny-llava-onevision")
    depth, clip = backend.depth, load_video(video, frames=frames)
    k = 18 * depth // 28
    seen = {}

    def before(i: int):  # registered before the method's hooks: what layer i gets
        def hook(module, args):
            seen.setdefault(i, args[0][0].clone())

        return hook

    def after(module, args, output):  # what layer k ran on, after the merge and the cut
        seen.setdefault("after", args[0][0].clone())

    layers = backend.language_model.layers
    handles = [layers[i].register_forward_pre_hook(before(i)) for i in (k - 1, k, k + 1)]
    handles.append(layers[k].register_forward_hook(after))
    try:
        result = run(backend, clip, prompt, "holitom", 0.25, max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()
    attention = result.selection.scores  # (N,) the last prompt token's at layer k - 1, heads averaged
    entering = attention.isfinite().nonzero()[:, 0]  # (M,) the tokens HoliTom's step before the LLM kept
    m = result.tokens["visual_entering"]
    prepared = prepare(backend, clip, prompt)
    start = int((prepared.inputs["input_ids"][0] == backend.visual_token_id(prepared)).nonzero()[0])
    full = seen[k]  # (L, D) entering layer k, the M visual tokens from `start` on
    keep, merged, joins = merge_code(full[start : start + m], attention[entering], 0.5)
    assert len(entering) == m and result.selection.keep.tolist() == entering[keep].tolist()
    for o, into in joins.items():
        assert int(result.selection.groups[entering[o]]) == int(entering[into])
    short = seen["after"]  # (L - M + K, D): the layer runs on the shorter sequence
    assert len(seen[k - 1]) == len(full) and len(short) == len(seen[k + 1]) == len(full) - m + len(keep)
    torch.testing.assert_close(short[start : start + len(keep)], merged, rtol=1e-5, atol=1e-5)
    assert torch.equal(short[:start], full[:start]) and torch.equal(short[start + len(keep) :], full[start + m :])
