"""The methods of issue 10 (VTC-CLS, ToMe, TransPrune's TTV, and TTV + IGA inside the LLM): each one's defining property on synthetic signals,
answers checked by hand, then end to end on the tiny LLaVA-NeXT."""

import math

import pytest
import torch
from conftest import photo, run_seeing_embeds, toy_geometry
from test_methods import random_signals

from explorer import ExplorerError, Signals, make, run
from explorer.methods.tome import bipartite_rounds
from explorer.methods.transprune import transition_variation
from explorer.views import visual as vis

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


@pytest.mark.parametrize("method", ["vtc-cls", "tome", "tome-vit", "transprune"])
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


# --- TransPrune inside the LLM (TTV + IGA) --------------------------------------------------------


def test_transprune_llm_adds_the_ttv_share_and_the_instruction_attention_share_by_hand():
    # TTV: 3 for token 5, 1 for token 9 (shares 3/4, 1/4); the text gives 0.3 to token 9 and 0.1 to
    # token 7 in both rows and heads (shares 3/4, 1/4). Scores: 9 -> 1/4 + 3/4 = 1, 5 -> 3/4, 7 -> 1/4
    g = toy_geometry()
    ttv, attention = torch.zeros(88), torch.zeros(2, 2, 88)
    ttv[5], ttv[9] = 3.0, 1.0
    attention[..., 9], attention[..., 7] = 0.3, 0.1
    s = Signals(g, 2, {"llm-transition": ttv, "llm-attention": attention}, torch.ones(88, dtype=torch.bool))
    selection = make("transprune-llm").select(s)
    assert selection.keep.tolist() == [5, 9]
    assert selection.scores[[9, 5, 7, 0]].tolist() == [1.0, 0.75, 0.25, 0.0]
    assert selection.maps["TTV share"][5] == 0.75 and selection.maps["IGA share"][9] == 0.75
    s = Signals(g, 3, s.maps, s.alive)
    assert make("transprune-llm").select(s).keep.tolist() == [5, 7, 9]
    alive = torch.ones(88, dtype=torch.bool)
    alive[5] = False  # cut before: the shares are over the tokens still there
    ttv[5], attention[..., 5] = math.nan, math.nan
    s = Signals(g, 1, {"llm-transition": ttv, "llm-attention": attention}, alive)
    assert make("transprune-llm").select(s).scores[9] == 1.0 + 0.75


def test_transprune_llm_cuts_before_layers_7_9_12_rescaled_to_the_budget():
    cuts = [(c.layer, c.score_layer, c.tokens) for c in make("transprune-llm").cuts(32, 576, 72)]
    assert cuts == [(7, 7, 504), (9, 9, 360), (12, 12, 72)]  # 7/8, 5/8, 1/8 of 576
    assert [(c.layer, c.tokens) for c in make("transprune-llm").cuts(4, 576, 72)] == [(1, 72)]
    with pytest.raises(ExplorerError, match="transprune-llm: layers must be"):
        make("transprune-llm", layers="7,9").cuts(32, 576, 72)


def sublayers_seen(backend, inputs, layers: tuple[int, ...]) -> dict:
    """What the attention and the MLP of the given LLM layers read and add, in one plain forward pass:
    (layer, "attention" or "mlp") -> (input (L, D), output (L, D))."""
    seen, handles = {}, []

    def record(key):
        def hook(module, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = out[0] if isinstance(out, tuple) else out
            seen[key] = (x[0].float(), y[0].float())

        return hook

    blocks = backend.model.model.language_model.layers
    for layer in layers:
        for name, part in (("attention", blocks[layer].self_attn), ("mlp", blocks[layer].mlp)):
            handles.append(part.register_forward_hook(record((layer, name)), with_kwargs=True))
    try:
        with torch.no_grad():
            backend.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_transprune_llm_transition_signal_equals_a_direct_computation(backend):
    # cuts before layers 2 and 3 keeping everything: the signal sums layer 1 (the one before the first
    # cut), then layers 1 and 2, attention and MLP each: TTV of input -> input + output
    from test_llm_methods import inputs_of

    prepared, inputs = inputs_of(backend, photo(336, 336, seed=7))
    seen = sublayers_seen(backend, inputs, (1, 2))
    ttv = {
        layer: sum(transition_variation(x, x + y) for (at, _), (x, y) in seen.items() if at == layer)
        for layer in (1, 2)
    }
    maps = {}

    def keep_all(cut, signals, alive):
        maps[cut] = signals
        return alive.nonzero()[:, 0]

    with torch.no_grad(), backend.pruning(prepared, [(2, 2), (3, 3)], ("llm-transition",), keep_all, True):
        backend.model(**inputs)
    image = (inputs["input_ids"][0] == backend.model.config.image_token_id).nonzero()[:, 0]
    torch.testing.assert_close(maps[0]["llm-transition"], ttv[1][image])
    torch.testing.assert_close(maps[1]["llm-transition"], (ttv[1] + ttv[2])[image])


def test_transprune_llm_meets_the_budget_and_keeping_everything_is_the_unreduced_model(backend):
    image = photo(640, 480, seed=5)
    settings = {"layers": "8,16,24", "budget_after_cuts": True}
    result = run(backend, image, PROMPT, "transprune-llm", 0.1, settings=settings, max_new_tokens=2)
    # on 32 layers: cuts before 8, 16, 24, keeping 234 * 0.875 / 0.125, 234 * 0.625 / 0.125 and 234
    assert [(c["layer"], c["kept"]) for c in result.tokens["llm_cuts"]] == [(8, 1638), (16, 1170), (24, 234)]
    assert result.tokens["visual_kept"] == len(result.selection.keep) == 234
    image = photo(336, 336, seed=5)
    full = run(backend, image, PROMPT, "none", max_new_tokens=8)
    assert run(backend, image, PROMPT, "transprune-llm", 1.0, max_new_tokens=8).answer_ids == full.answer_ids
    assert "Differs from the paper" in vis.explain("transprune-llm") and "transition" in vis.explain("transprune-llm")
