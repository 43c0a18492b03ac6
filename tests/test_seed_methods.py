"""The methods of issue 10 (VTC-CLS, ToMe, TransPrune's TTV): each one's defining property on synthetic signals,
answers checked by hand, then end to end on the tiny LLaVA-NeXT."""

import math

import pytest
import torch
from conftest import photo, run_seeing_embeds
from test_methods import random_signals

from explorer import ExplorerError, make, run
from explorer import visual as vis
from explorer.methods.tome import bipartite_rounds
from explorer.methods.transprune import transition_variation

PROMPT = "What is shown in this image?"
BASE = 0  # the thumbnail partition of the toy geometry


def unit(degrees: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def kept_in(selection, g, p: int) -> torch.Tensor:
    return selection.keep[g.partition[selection.keep] == p]


# --- VTC-CLS --------------------------------------------------------------------------------------


def test_vtc_cls_reads_a_range_of_layers_ending_at_the_feature_layer():
    assert make("vtc-cls").needs == ("cls@feature-1", "cls@feature")
    assert make("vtc-cls", layers=1).needs == ("cls@feature",)
    assert make("vtc-cls", layers=4).needs == ("cls@feature-3", "cls@feature-2", "cls@feature-1", "cls@feature")


def test_vtc_cls_keeps_the_top_of_the_summed_layers_by_hand():
    # budget 44 of 88: the thumbnail's share is 44 * 16 / 88 = 8. Layer feature-1 looks at tokens
    # 0-5, the feature layer at 4-11: the sums are 2 for 4, 5; 1 for 0-3 and 6-11; 0 for 12-15;
    # the top 8 (ties to the lower index) are 4, 5 and 0, 1, 2, 3, 6, 7
    s = random_signals(44)
    for token in range(16):
        s["cls@feature-1"][token] = float(token < 6)
        s["cls@feature"][token] = float(4 <= token < 12)
    selection = make("vtc-cls").select(s)
    assert selection.budgets["base"] == 8
    assert kept_in(selection, s.geometry, BASE).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert selection.scores[:16].tolist() == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    one_layer = make("vtc-cls", layers=1).select(s)  # the feature layer alone: FasterVLM's choice
    assert kept_in(one_layer, s.geometry, BASE).tolist() == list(range(4, 12))


def test_vtc_cls_with_one_layer_is_fastervlm():
    s = random_signals(30)
    assert torch.equal(make("vtc-cls", layers=1).select(s).keep, make("cls").select(s).keep)


def test_vtc_cls_sums_the_feature_layer_and_the_one_below_it_on_the_tiny_model(backend):
    # the tiny CLIP has 3 layers and its feature layer is 1: the range is layers 0 and 1
    image = photo(640, 480, seed=4)
    result = run(backend, image, PROMPT, "vtc-cls", 0.2, max_new_tokens=1)
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        _, signals = backend.encode(prepared, ("cls@0", "cls@1", "cls@feature-1"))
    torch.testing.assert_close(signals["cls@feature-1"], signals["cls@0"], equal_nan=True)
    torch.testing.assert_close(result.selection.scores, signals["cls@0"] + signals["cls@1"], equal_nan=True)
    assert result.tokens["visual_kept"] == result.tokens["visual_budget"]


def test_a_range_below_the_first_layer_is_refused_by_name(backend):
    with pytest.raises(ExplorerError, match="cls@feature-2"):
        run(backend, photo(320, 240), PROMPT, "vtc-cls", 0.2, settings={"layers": 3}, max_new_tokens=1)


# --- ToMe -----------------------------------------------------------------------------------------


def tome_keys() -> torch.Tensor:
    return torch.stack([unit(a) for a in (0, 10, 90, 100, 180, 95)])  # (6, 2)


def test_tome_merges_each_a_token_into_its_most_similar_b_token_by_hand():
    # round 1: A = 0, 2, 4 and B = 1, 3, 5; best partners 0->1 (10 deg), 2->5 (5 deg), 4->3 (80 deg);
    # two merges to reach 4: the two closest pairs, 2->5 and 0->1
    owner, when = bipartite_rounds(tome_keys(), 4)
    assert owner.tolist() == [1, 1, 5, 3, 4, 5] and when.tolist() == [1, 0, 1, 0, 0, 0]


def test_tome_runs_rounds_on_what_is_left_until_the_budget():
    # to 2: round 1 merges the whole A side (r = min(6 - 2, 3)): 0->1, 2->5, 4->3; round 2 on 1, 3, 5:
    # A = 1, 5 and B = 3; token 3 holds 100 and 180 deg (140 deg), token 5 holds 90 and 95 deg
    # (92.5 deg, 47.5 away), token 1 holds 0 and 10 deg (5 deg, 135 away): 5 -> 3
    owner, when = bipartite_rounds(tome_keys(), 2)
    assert owner.tolist() == [1, 1, 3, 3, 3, 3] and when.tolist() == [1, 0, 1, 0, 1, 2]
    owner, when = bipartite_rounds(tome_keys(), 0)  # a share of nothing: everything is dropped
    assert when.tolist() == [0] * 6


def test_tome_groups_and_weights_make_every_kept_token_the_mean_of_its_group():
    s = random_signals(20)
    selection = make("tome").select(s)
    g, groups, keep = s.geometry, selection.groups, selection.keep
    assert torch.equal(groups[keep], keep)
    weights = selection.weights.to_dense()  # (K, N)
    for row, token in enumerate(keep.tolist()):
        group = (groups == token).nonzero()[:, 0]
        assert weights[row].nonzero()[:, 0].tolist() == group.tolist()
        torch.testing.assert_close(weights[row, group], torch.full((len(group),), 1 / len(group)))
    for p, name in enumerate(g.names[:-1]):  # every patch lands in a kept token of its own partition
        members = g.members(p)
        assert (g.partition[groups[members]] == p).all() and len(kept_in(selection, g, p)) == selection.budgets[name]
    rounds = selection.maps["merge round"]
    assert (rounds[keep[g.partition[keep] != 5]] == 0).all() and (
        rounds[(groups >= 0) & (groups != torch.arange(len(g)))] >= 1
    ).all()
    assert selection.stats["merge rounds"]["base"] == int(rounds[g.members(BASE)].max())


def test_tome_keeps_everything_at_the_full_budget():
    selection = make("tome").select(random_signals(88))
    assert torch.equal(selection.keep, torch.arange(88)) and torch.equal(selection.groups, torch.arange(88))


def test_tome_merged_features_reach_the_llm_as_group_means(backend):
    image = photo(640, 480, seed=9)
    result, embeds = run_seeing_embeds(backend, image, PROMPT, "tome", 0.2)
    assert result.tokens["visual_kept"] == 468
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, signals = backend.encode(prepared, ("hidden@feature",))
        hidden, groups, keep = signals["hidden@feature"], result.selection.groups, result.selection.keep
        projector = backend.model.model.multi_modal_projector
        expected = features.clone()
        for t in keep.tolist():
            group = groups == t
            if group.sum() > 1:
                expected[t] = projector(hidden[group].mean(0))
    ids = backend.generate_inputs(prepared, features, keep)["input_ids"][0]
    received = embeds[0][ids == backend.model.config.image_token_id]
    torch.testing.assert_close(received, expected[keep])


@pytest.mark.parametrize("method", ["vtc-cls", "tome", "transprune"])
def test_every_seed_method_is_explained_and_deterministic_end_to_end(backend, method):
    image = photo(640, 480, seed=5)
    first, second = (run(backend, image, PROMPT, method, 0.2, max_new_tokens=4) for _ in range(2))
    assert torch.equal(first.selection.keep, second.selection.keep)
    assert first.answer_ids == second.answer_ids and first.tokens["visual_kept"] == 468
    assert "Differs from the paper" in vis.explain(method)


# --- TransPrune (TTV) -----------------------------------------------------------------------------


def test_ttv_of_three_tokens_by_hand():
    # updates (after - before): token 0 turns a right angle (1 - cos = 1) and is as long as its
    # input; token 1 grows along itself (1 - cos = 0), 3 times as long; token 2 is reversed
    # (1 - cos = 2), as long as its input. TTV = magnitude * softmax(1, 0, 2) = (e, 3, e^2) / (1 + e + e^2)
    before = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    after = torch.tensor([[1.0, 1.0], [0.0, 8.0], [0.0, 0.0]])
    e = math.e
    expected = torch.tensor([e, 3, e * e]) / (1 + e + e * e)
    torch.testing.assert_close(transition_variation(before, after), expected)


def test_transprune_keeps_the_top_ttv_summed_over_its_layers():
    s = random_signals(30)
    method = make("transprune", transitions=2)
    assert method.needs == ("hidden@feature-2", "hidden@feature-1", "hidden@feature")
    maps = dict(
        s.maps, **{"hidden@feature-2": s["hidden@feature"] * 0.5 + 1, "hidden@feature-1": s["hidden@feature-1"]}
    )
    s = type(s)(s.geometry, s.budget, maps)
    selection = method.select(s)
    real = s.geometry.partition != 5
    states = [s[name][real] for name in method.needs]
    expected = transition_variation(states[0], states[1]) + transition_variation(states[1], states[2])
    torch.testing.assert_close(selection.scores[real], expected)
    assert selection.scores[~real].isnan().all()
    for p in range(5):
        members, kept = s.geometry.members(p), kept_in(selection, s.geometry, p)
        dropped = members[~torch.isin(members, kept)]
        assert len(dropped) == 0 or selection.scores[kept].min() >= selection.scores[dropped].max()


def test_transprune_scores_the_feature_layer_transition_on_the_tiny_model(backend):
    image = photo(640, 480, seed=4)
    result = run(backend, image, PROMPT, "transprune", 0.2, max_new_tokens=1)
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        _, signals = backend.encode(prepared, ("hidden@0", "hidden@1"))
    real = ~signals["hidden@0"].isnan().any(1)
    expected = transition_variation(signals["hidden@0"][real].float(), signals["hidden@1"][real].float())
    torch.testing.assert_close(result.selection.scores[real], expected)
    assert result.tokens["visual_kept"] == result.tokens["visual_budget"] == 468
