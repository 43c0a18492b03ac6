"""The vision-stage methods of issue 4 (VisionZip, PruMerge+, GlobalCom2, DivPrune, VisPruner): each
one's defining property on synthetic signals, answers checked by hand, then end to end on the tiny
LLaVA-NeXT: the signals against stock transformers, merged features, budgets and answers."""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import photo, run_seeing_embeds, toy_geometry
from test_methods import random_signals

from explorer import ExplorerError, Signals, make, run
from explorer.core import Geometry
from explorer.methods import on_images
from explorer.methods.divprune import DistanceRows, farthest_walk, max_min_diverse
from explorer.views import visual as vis

PROMPT = "What is shown in this image?"
BASE, NEWLINE = 0, 5  # partitions of the toy geometry


def unit(degrees: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def kept_in(selection, g, p: int) -> torch.Tensor:
    return selection.keep[g.partition[selection.keep] == p]


# --- VisionZip ------------------------------------------------------------------------------------


def test_visionzip_keeps_the_top_by_cls_and_every_other_token_joins_its_most_similar_target():
    s = random_signals(44)
    selection = make("visionzip", contextual=0.5).select(s)
    g, groups = s.geometry, selection.groups
    keys = F.normalize(s["keys@feature"].mean(1), dim=-1)
    for p in range(NEWLINE):
        members, kept = g.members(p), kept_in(selection, g, p)
        assert len(kept) == selection.budgets[g.names[p]]
        targets = kept[selection.maps["contextual"][kept] == 1]
        dominant = kept[selection.maps["contextual"][kept] == 0]
        assert len(targets) == len(kept) // 2  # floor(0.5 * k)
        others = members[~torch.isin(members, dominant)]
        assert s["cls@feature"][dominant].min() > s["cls@feature"][others].max()
        for token in others[~torch.isin(others, targets)]:
            similarity = keys[targets] @ keys[token]
            assert groups[token] in targets and similarity[targets == groups[token]] == similarity.max()
    assert torch.equal(groups[selection.keep], selection.keep)
    assert (groups[g.partition == NEWLINE] == -1).all()  # newlines are dropped, not merged


def visionzip_signals() -> Signals:
    """The thumbnail's attention falls with the token index; its keys point at chosen angles."""
    s = random_signals(44)
    angles = {5: 0, 7: 90, 9: 180, 11: 270, 6: 260, 8: 280, 10: 265, 12: 10, 13: 350, 14: 170, 15: 190}
    for token in range(16):
        s["cls@feature"][token] = 1 - token / 16
        s["keys@feature"][token] = 0.0
        s["keys@feature"][token, :, :2] = unit(angles.get(token, 45))  # both heads alike
    return s


def test_visionzip_groups_and_merge_weights_by_hand():
    # base gets 9 of 44 (44 * 16 / 80 = 8.8, largest remainder first); contextual = floor(0.5 * 9) = 4;
    # dominant: tokens 0-4; the 11 left are 5..15, targets every 11 // 4 = 2nd: 5, 7, 9, 11
    selection = make("visionzip", contextual=0.5).select(visionzip_signals())
    assert selection.budgets["base"] == 9
    assert kept_in(selection, toy_geometry(), BASE).tolist() == [0, 1, 2, 3, 4, 5, 7, 9, 11]
    joined = {t: selection.groups[t].item() for t in (6, 8, 10, 12, 13, 14, 15)}
    assert joined == {6: 11, 8: 11, 10: 11, 12: 5, 13: 5, 14: 9, 15: 9}
    weights = selection.weights.to_dense()
    row = {t: weights[selection.keep.tolist().index(t)] for t in (0, 5, 7, 9, 11)}
    assert row[0].nonzero()[:, 0].tolist() == [0] and row[7].nonzero()[:, 0].tolist() == [7]  # alone
    assert {i: round(w.item(), 4) for i, w in enumerate(row[11]) if w} == {6: 0.3333, 8: 0.3333, 10: 0.3333, 11: 1.0}
    assert {i: w.item() for i, w in enumerate(row[5]) if w} == {5: 1.0, 12: 0.5, 13: 0.5}
    assert {i: w.item() for i, w in enumerate(row[9]) if w} == {9: 1.0, 14: 0.5, 15: 0.5}


def test_visionzip_uses_the_papers_split_by_default():
    assert [math.floor(make("visionzip").contextual * t) for t in (64, 128, 192)] == [10, 20, 30]


# --- PruMerge+ ------------------------------------------------------------------------------------


def spiky_signals(budget: int = 20) -> Signals:
    """Attention in [0, 1) with two outliers, 3 higher, in every partition but the newlines."""
    s = random_signals(budget)
    for p in range(NEWLINE):
        s["cls-onehead@last"][s.geometry.members(p)[[3, 9]]] += 3.0
    return s


def iqr_rule(attention: np.ndarray) -> tuple[int, int]:
    """PruMerge+'s count, the paper's way: IQR outliers, then every (M // n // 3)-th token not one of them."""
    q1, q3 = np.percentile(attention, 25), np.percentile(attention, 75)
    outliers = np.flatnonzero(attention > q3 + 1.5 * (q3 - q1))
    n = max(1, len(outliers))
    top = set(np.argsort(-attention, kind="stable")[:n].tolist())
    spatial = set(range(0, len(attention) - 1, max(1, len(attention) // n // 3))) - top
    return n, len(spatial)


def test_prumerge_adaptive_count_is_the_iqr_rules_count():
    s = spiky_signals()
    selection = make("prumerge+", adaptive=True).select(s)
    g = s.geometry
    for p in range(NEWLINE):
        n, spatial = iqr_rule(s["cls-onehead@last"][g.members(p)].numpy())
        assert n == 2  # the spikes
        assert selection.stats["outliers"][g.names[p]] == n and selection.stats["spatial"][g.names[p]] == spatial
        assert len(kept_in(selection, g, p)) == n + spatial
    assert len(kept_in(selection, g, NEWLINE)) == 0 and selection.budgets == {}


def test_prumerge_fixed_budget_keeps_a_quarter_by_attention_and_spreads_the_rest():
    s = spiky_signals(40)  # 8 per partition: 2 by attention, 6 spread
    selection = make("prumerge+").select(s)
    g, attention = s.geometry, s["cls-onehead@last"]
    for p in range(NEWLINE):
        members, kept = g.members(p), kept_in(selection, g, p)
        best = members[attention[members].argsort(descending=True)[:2]]
        rest = members[~torch.isin(members, best)]  # 14 left: every 14 * i // 6-th
        assert set(kept.tolist()) == set(best.tolist()) | set(rest[[0, 2, 4, 7, 9, 11]].tolist())


def test_prumerge_kept_tokens_absorb_their_most_similar_dropped_tokens_weighted_by_attention():
    s = spiky_signals(40)
    selection = make("prumerge+", neighbours=3).select(s)
    g, attention, keep = s.geometry, s["cls-onehead@last"], selection.keep
    keys = F.normalize(s["keys@last"].flatten(1), dim=-1)
    weights = selection.weights.to_dense()  # (K, N)
    for p in range(NEWLINE):
        members, kept = g.members(p), kept_in(selection, g, p)
        dropped = members[~torch.isin(members, kept)]
        for token in kept:
            row = weights[keep.tolist().index(token)]
            nearest = dropped[(keys[dropped] @ keys[token]).argsort(descending=True)[:3]]
            assert set(row.nonzero()[:, 0].tolist()) == {token.item(), *nearest.tolist()}
            assert row[token] == 1 and torch.equal(row[nearest], attention[nearest])
        for token in dropped:  # its group: the most similar of the kept tokens that absorbed it
            absorbers = kept[weights[torch.searchsorted(keep, kept), token] > 0]
            if len(absorbers) == 0:
                assert selection.groups[token] == -1
            else:
                assert selection.groups[token] == absorbers[(keys[absorbers] @ keys[token]).argmax()]


# --- GlobalCom2 -----------------------------------------------------------------------------------


def globalcom2_signals(budget: int, hot: list[tuple[int, int]], seed: int = 0) -> Signals:
    """Thumbnail attention 20 on the given cells of its 4x4 grid, 0 elsewhere; crops random."""
    s = random_signals(budget, seed)
    s["cls-logits@last"][:16] = 0.0
    for r, c in hot:
        s["cls-logits@last"][4 * r + c] = 20.0
    return s


def ratios(selection, g) -> list[float]:
    return [selection.budgets[g.names[p]] / len(g.members(p)) for p in range(1, NEWLINE)]


def test_globalcom2_gives_crops_with_more_thumbnail_attention_larger_ratios():
    # crop 0,0 holds 3 hot cells of the thumbnail, crop 1,1 one, the others none
    s = globalcom2_signals(44, [(0, 0), (0, 1), (1, 1), (3, 3)])
    selection = make("globalcom2").select(s)
    g = s.geometry
    r00, r01, r10, r11 = ratios(selection, g)
    assert r00 > r11 > r01 and r00 > r11 > r10
    importance = selection.stats["crop importance"]
    assert importance["crop 0,0"] > importance["crop 1,1"] > importance["crop 0,1"] == importance["crop 1,0"]
    # the higher the temperature, the more alike the crops' ratios
    spread = [
        max(ratios(m, g)) - min(ratios(m, g))
        for m in (make("globalcom2", temperature=t).select(s) for t in (1, 10, 100))
    ]
    assert spread[0] >= spread[1] > spread[2] > 0


def test_globalcom2_keeps_every_newline_and_meets_the_budget():
    s = globalcom2_signals(44, [(0, 0)])
    selection = make("globalcom2").select(s)
    g = s.geometry
    assert len(kept_in(selection, g, NEWLINE)) == 8 and len(selection.keep) == 44
    assert len(make("globalcom2").select(globalcom2_signals(10, [(0, 0)])).keep) == 10  # 5 newlines at most


def test_globalcom2_scores_crop_tokens_by_their_own_and_the_thumbnails_attention():
    s = globalcom2_signals(44, [(0, 0), (2, 3)])
    selection = make("globalcom2").select(s)
    g, own = s.geometry, s["cls-logits@last"]
    # the toy crops tile an 8x8 grid over the image: the guide is the 4x4 thumbnail resized onto it
    thumbnail = own[:16].view(1, 1, 4, 4)
    resized = F.interpolate(thumbnail, size=(8, 8), mode="bilinear", align_corners=False).flatten()
    stitched = torch.tensor([16 + 9 * y + x for y in range(8) for x in range(8)])  # LLM index of cell (y, x)
    torch.testing.assert_close(selection.maps["thumbnail guide"][stitched], resized)
    for p in range(1, NEWLINE):
        members, kept = g.members(p), kept_in(selection, g, p)
        score = F.normalize(own[members], dim=0) + F.normalize(resized[torch.isin(stitched, members)], dim=0)
        assert set(kept.tolist()) == set(members[score.argsort(descending=True)[: len(kept)]].tolist())
    base = kept_in(selection, g, BASE)
    assert set(base.tolist()) == set(own[:16].argsort(descending=True, stable=True)[: len(base)].tolist())


# --- DivPrune -------------------------------------------------------------------------------------


def line_geometry(n: int) -> Geometry:
    """n tokens in one row of one partition."""
    cells = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1)
    boxes = torch.stack([torch.arange(n), torch.zeros(n), torch.arange(n) + 1, torch.ones(n)], 1).float()
    return Geometry(("base",), torch.zeros(n, dtype=torch.long), cells, boxes, (n, 1))


def test_divprune_picks_the_spread_out_tokens_by_hand():
    angles = [0, 10, 20, 90, 100, 175, 200, 270]
    features = torch.stack([unit(a) for a in angles]) * torch.tensor([[1.0], [3.0]]).repeat(4, 1)  # lengths vary
    s = Signals(line_geometry(8), 4, {"features": features})
    selection = make("divprune").select(s)
    # 270 is farthest from its nearest neighbour (70 degrees); then 90 (180 from it), then 0 (90 from
    # both), then 175 (85 from 90)
    assert selection.keep.tolist() == [0, 3, 5, 7]
    assert selection.maps["picked early"][[7, 3, 0, 5]].tolist() == [1, 0.75, 0.5, 0.25]
    near = selection.maps["distance to kept"]  # 10 is 10 degrees from 0, 200 is 25 from 175
    torch.testing.assert_close(near[[1, 6]], 1 - torch.cos(torch.deg2rad(torch.tensor([10.0, 25.0]))))
    assert (near[selection.keep] == 0).all()


def naive_greedy(x: torch.Tensor, k: int) -> list[int]:
    """The max-min greedy as the paper writes it, from scratch."""
    d = 1 - F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
    n = len(x)
    chosen = [max(range(n), key=lambda i: (min(d[i, j] for j in range(n) if j != i), -i))]
    while len(chosen) < k:
        left = [i for i in range(n) if i not in chosen]
        chosen.append(max(left, key=lambda i: (min(d[i, j] for j in chosen), -i)))
    return chosen


def min_pairwise(x: torch.Tensor, tokens: list[int]) -> float:
    d = 1 - F.normalize(x[tokens], dim=-1) @ F.normalize(x[tokens], dim=-1).T
    return d[~torch.eye(len(tokens), dtype=torch.bool)].min().item()


@pytest.mark.parametrize("budget", [2, 5, 12])
def test_divprune_spreads_as_far_as_a_greedy_rerun(budget):
    s = random_signals(budget, seed=budget)
    x = s["features"][:30]
    sub = Signals(line_geometry(30), budget, {"features": x})
    keep = make("divprune").select(sub).keep.tolist()
    rerun = naive_greedy(x, budget)
    assert keep == sorted(rerun)
    assert min_pairwise(x, keep) >= min_pairwise(x, rerun) - 1e-6


def whole_matrix_walk(x: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """The walk on the whole (N, N) distance matrix, built at once: the picks in order and each token's
    distance to the nearest pick."""
    u = F.normalize(x, dim=-1)
    distance = 1 - u @ u.T
    picks = [int(distance.clone().fill_diagonal_(torch.inf).amin(1).argmax())]
    to_set = distance[picks[0]].clone()
    to_set[picks[0]] = -torch.inf
    while len(picks) < k:
        picks.append(int(to_set.argmax()))
        to_set = torch.minimum(to_set, distance[picks[-1]])
        to_set[picks[-1]] = -torch.inf
    return picks, to_set.clamp(min=0)


@pytest.mark.parametrize("k", [1, 40, 140, 699])
def test_divprune_computes_few_rows_and_walks_as_the_whole_matrix_would(k):
    generator = torch.Generator().manual_seed(k)
    centres = torch.randn(12, 32, generator=generator)
    x = centres[torch.randint(12, (700,), generator=generator)] + 0.3 * torch.randn(700, 32, generator=generator)
    rows = DistanceRows(F.normalize(x, dim=-1))
    picked, distance = farthest_walk(rows, rows.most_isolated(), k, exclude_picked=True)
    expected, to_set = whole_matrix_walk(x, k)
    assert picked.tolist() == expected
    # a block's products may differ from the whole matrix's in the last bit
    torch.testing.assert_close(torch.from_numpy(distance).clamp(min=0), to_set)
    if k <= 140:  # the walk read its picks' rows and a few likely ones: not the whole matrix
        assert len(rows.rows) < len(x) / 2


def test_divprune_breaks_ties_as_the_whole_matrix_does():
    x = torch.eye(300, 290)  # tokens 290..299 repeat no one: rows of zeros, 1 from everyone; 0..289 one-hot
    x[290:] = torch.eye(290)[:10]  # ... now 290..299 repeat 0..9: distances 0 and 1 only, ties everywhere
    for k in (1, 5, 200, 285):
        assert max_min_diverse(x, k)[0].tolist() == whole_matrix_walk(x, k)[0]
    assert max_min_diverse(x, 1)[0].tolist() == [10]  # the first with no duplicate


def test_divprune_never_picks_a_token_twice_when_only_duplicates_are_left():
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 3)
    keep = make("divprune").select(Signals(line_geometry(8), 8, {"features": x})).keep
    assert keep.tolist() == list(range(8))


# --- VisPruner ------------------------------------------------------------------------------------


def test_vispruner_keeps_the_important_half_then_drops_duplicates_by_hand():
    # 66 of 88: 12 per partition and 6 newlines; the thumbnail: tokens 0-5 by attention, then 6-15 in
    # order. Rounds: r = min(8, 10 - 6) = 4; A = 6, 8, 10, 12, 14 and B = 7, 9, 11, 13, 15. Tokens 6,
    # 10, 14 (and 7, 11, 15) are one vector, 8, 12, 9, 13 are each their own: A's duplication is
    # 1, 0, 1, 0, 1, so 6, 10, 14 go first, then 8 (the first of the zeros): 12 and all of B stay.
    s = random_signals(66)
    s["cls@feature"][:16] = torch.linspace(1.0, 0.5, 16)
    own = {8: 1, 12: 2, 9: 3, 13: 4}
    for token in range(6, 16):
        s["hidden@feature"][token] = torch.eye(6)[own.get(token, 0)]
    selection = make("vispruner").select(s)
    assert selection.budgets["base"] == 12
    assert kept_in(selection, s.geometry, BASE).tolist() == [0, 1, 2, 3, 4, 5, 7, 9, 11, 12, 13, 15]
    assert selection.maps["diverse"][:16].nonzero()[:, 0].tolist() == [7, 9, 11, 12, 13, 15]


def test_vispruner_important_share_is_the_top_by_cls_attention():
    s = random_signals(44)
    selection = make("vispruner", important=0.5).select(s)
    g, score = s.geometry, s["cls@feature"]
    for p in range(NEWLINE):
        members, kept = g.members(p), kept_in(selection, g, p)
        important = kept[selection.maps["diverse"][kept] == 0]
        assert len(important) == len(kept) // 2
        assert score[important].min() > score[members[~torch.isin(members, important)]].max()


# --- end to end on the tiny LLaVA-NeXT ------------------------------------------------------------

NEW = ["visionzip", "prumerge+", "globalcom2", "divprune", "vispruner"]


@pytest.mark.parametrize("method", [m for m in on_images() if m != "hired"])  # hired drops the newlines
def test_budget_one_keeps_everything_and_answers_as_the_unreduced_model(backend, method):
    image = photo(800, 400, seed=3)
    reference = run(backend, image, PROMPT, "none", max_new_tokens=8)
    result = run(backend, image, PROMPT, method, 1.0, max_new_tokens=8)
    assert torch.equal(result.selection.keep, torch.arange(result.tokens["visual_full"]))
    assert result.answer_ids == reference.answer_ids


@pytest.mark.parametrize("method", NEW)
def test_every_new_method_is_deterministic_end_to_end(backend, method):
    image = photo(640, 480, seed=5)
    first, second = (run(backend, image, PROMPT, method, 0.2, max_new_tokens=4) for _ in range(2))
    assert torch.equal(first.selection.keep, second.selection.keep)
    assert first.answer_ids == second.answer_ids and first.tokens["visual_kept"] == 468


def stock_vision(checkpoint, backend, image):
    """Hidden states of the stock CLIP tower (eager attention) on the crops of `image`, and the geometry."""
    import transformers

    eager = transformers.LlavaNextForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager")
    prepared = backend.prepare(image, PROMPT)
    crops = prepared.inputs["pixel_values"][0, :5]  # thumbnail + 2x2 crops
    with torch.no_grad():
        out = eager.model.vision_tower(crops, output_hidden_states=True, output_attentions=True)
    return eager, prepared, out


def test_the_signals_match_the_stock_vision_tower(backend, checkpoint):
    image = photo(640, 480, seed=7)
    eager, prepared, out = stock_vision(checkpoint, backend, image)
    names = ("cls@last", "cls-onehead@last", "cls-logits@last", "keys@feature", "hidden@feature", "features")
    with torch.no_grad():
        features, signals = backend.encode(prepared, names)
    src = prepared.source
    ok = src >= 0

    def llm_order(per_crop):  # (crops, T-1, ...) -> (N, ...) rows of the visual tokens
        return per_crop.flatten(0, 1)[src.clamp(min=0)][ok]

    layer = eager.model.vision_tower.encoder.layers[2]  # the tiny CLIP's last layer
    x = layer.layer_norm1(out.hidden_states[2])
    q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)  # (crops, T, 32)
    heads = q.view(5, -1, 4, 8).transpose(1, 2) @ k.view(5, -1, 4, 8).transpose(1, 2).transpose(-1, -2)  # (5, 4, T, T)
    torch.testing.assert_close(signals["cls@last"][ok], llm_order(out.attentions[2][:, :, 0, 1:].sum(1)))
    torch.testing.assert_close(signals["cls-logits@last"][ok], llm_order((heads * 8**-0.5).mean(1)[:, 0, 1:]))
    onehead = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(32), -1)[:, 0, 1:]
    torch.testing.assert_close(signals["cls-onehead@last"][ok], llm_order(onehead))

    feature = eager.model.vision_tower.encoder.layers[1]
    keys = feature.self_attn.k_proj(feature.layer_norm1(out.hidden_states[1]))[:, 1:].view(5, -1, 4, 8)
    torch.testing.assert_close(signals["keys@feature"][ok], llm_order(keys))
    torch.testing.assert_close(signals["hidden@feature"][ok], llm_order(out.hidden_states[2][:, 1:]))
    assert signals["hidden@feature"][~ok].isnan().all() and signals["keys@feature"][~ok].isnan().all()
    torch.testing.assert_close(signals["features"], features)


def test_merged_features_reach_the_llm_as_the_paper_computes_them(backend):
    """VisionZip's contextual tokens carry projector(target + mean of the tokens that joined it)."""
    image = photo(640, 480, seed=9)
    result, embeds = run_seeing_embeds(backend, image, PROMPT, "visionzip", 0.2)
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, signals = backend.encode(prepared, ("hidden@feature",))
        hidden, groups, keep = signals["hidden@feature"], result.selection.groups, result.selection.keep
        projector = backend.model.model.multi_modal_projector
        expected = features.clone()
        targets = keep[result.selection.maps["contextual"][keep] == 1]
        for t in targets:
            joined = (groups == t) & (torch.arange(len(groups)) != t)
            expected[t] = projector(hidden[t] + (hidden[joined].mean(0) if joined.any() else 0))
    assert len(targets) > 0 and any(((groups == t).sum() > 1).item() for t in targets)
    ids = backend.generate_inputs(prepared, features, keep)["input_ids"][0]  # the prompt the LLM got
    received = embeds[0][ids == backend.model.config.image_token_id]  # its visual rows
    torch.testing.assert_close(received, expected[keep])


def test_prumerge_adaptive_reports_its_own_count_and_no_budget(backend):
    result = run(backend, photo(640, 480), PROMPT, "prumerge+", 0.2, settings={"adaptive": True}, max_new_tokens=1)
    counts = result.selection.stats
    assert result.budget is None and result.tokens["adaptive"] is True and result.tokens["visual_budget"] is None
    assert result.tokens["visual_kept"] == sum(counts["outliers"].values()) + sum(counts["spatial"].values())
    assert result.to_json()["budget"] is None and result.settings["adaptive"] is True
    assert "(adaptive: the method chose how many)" in vis.budget_figure(result).layout.title.text
    fixed = run(backend, photo(640, 480), PROMPT, "prumerge+", 0.2, max_new_tokens=1)
    assert fixed.tokens["adaptive"] is False and fixed.tokens["visual_kept"] == fixed.tokens["visual_budget"] == 468


def test_a_backend_names_the_signal_it_cannot_give(backend):
    prepared = backend.prepare(photo(64, 64), PROMPT)
    with pytest.raises(ExplorerError, match="cannot give the signal 'values@feature'; it gives features, cls@"):
        backend.encode(prepared, ("values@feature",))
    with pytest.raises(
        ExplorerError, match=r"'keys@7': the vision encoder has layers 0..2, feature, feature-<k> and last"
    ):
        backend.encode(prepared, ("keys@7",))


def test_the_app_says_in_words_what_each_new_method_reads():
    for name in NEW:
        text = vis.explain(name)
        assert "Differs from the paper" in text and "@" not in text, (name, text)
    assert "with the heads joined into one at the last vision layer" in vis.explain("prumerge+")
    assert "before the softmax at the last vision layer" in vis.explain("globalcom2")
    assert "the vision encoder's output for each patch at the feature layer" in vis.explain("visionzip")


@pytest.mark.parametrize("method", ["visionzip", "prumerge+"])
def test_a_merging_selection_is_small_and_travels_between_processes(backend, method):
    selection = run(backend, photo(640, 480), PROMPT, method, 0.2, max_new_tokens=1).selection
    weights = selection.weights
    assert weights.is_sparse and weights.device.type == "cpu" and weights.shape == (468, 2340)
    assert weights._nnz() < 468 * 40  # itself plus at most 32 neighbours per kept token, not K x N
    copy = pickle.loads(pickle.dumps(selection))
    assert torch.equal(copy.weights.to_dense(), weights.to_dense()) and torch.equal(copy.groups, selection.groups)
