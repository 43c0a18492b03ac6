"""Methods that act both before the LLM and inside it (MustDrop, AIM): each stage's rule on synthetic
signals with answers checked by hand, then end to end on the tiny LLaVA-NeXT: the budget is met,
keeping everything changes nothing, and what the vision step merged is what the LLM receives."""

import math

import pytest
import torch
from conftest import photo, toy_geometry

from explorer import ExplorerError, Signals, make, run
from explorer.methods.mustdrop import window_similarity, windows
from explorer.views import teach
from explorer.views import visual as vis

PROMPT = "What is shown in this image?"
N = 88  # tokens of the toy geometry: a 4x4 thumbnail, 2x2 crops of 4x4 in an 8x8 grid, 8 newlines
AFTER = {"budget_after_cuts": True}  # the budget is what the last cut leaves


def at(y: int, x: int) -> int:
    """The toy geometry's token at row y, column x of the stitched 8x8 crop grid."""
    return 16 + 9 * y + x


def vision_signals(budget: int, seed: int = 0, **maps) -> Signals:
    """Random vision signals on the toy geometry, NaN for newlines; `maps` replace some."""
    g = toy_geometry()
    generator = torch.Generator().manual_seed(seed)
    newline = g.partition == g.names.index("newline")
    shapes = {"hidden@0": (6,), "hidden@feature": (6,), "cls@last": (), "features": (8,)}
    signals = {}
    for name, shape in shapes.items():
        values = torch.rand(N, *shape, generator=generator)
        signals[name] = (
            values if name == "features" else values.masked_fill(newline.view(-1, *[1] * len(shape)), math.nan)
        )
    return Signals(g, budget, {**signals, **maps})


def llm_signals(budget: int, attention: torch.Tensor, alive=None, **maps) -> Signals:
    alive = torch.ones(N, dtype=torch.bool) if alive is None else alive
    return Signals(toy_geometry(), budget, {"llm-attention": attention, **maps}, alive)


# --- MustDrop: before the LLM ---------------------------------------------------------------------


def test_mustdrop_windows_tile_each_partition_from_its_top_left_corner():
    g = toy_geometry()
    assert windows(g, 0, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert windows(g, 0, 3).tolist() == [[0, 1, 2, 4, 5, 6, 8, 9, 10]]  # the last row and column fit no window
    assert windows(g, 4, 2)[0].tolist() == [at(4, 4), at(4, 5), at(5, 4), at(5, 5)]  # crop 1,1 starts at (4, 4)
    assert windows(g, 0, 5).shape == (0, 25)


def test_mustdrop_window_similarity_is_the_mean_over_distinct_pairs():
    # three unit vectors at 0, 0 and 90 degrees: pairs (1, 0, 0) twice each -> mean 1/3
    hidden = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(window_similarity(hidden, torch.tensor([[0, 1, 2]])), torch.tensor([1 / 3]))


def alike_hidden() -> torch.Tensor:
    """hidden@0 with the thumbnail's top-left 2x2 window all alike (one direction) and crop 0,0's
    top-left window alike but a little less; every other token points its own way."""
    hidden = torch.eye(N)[:, :N].clone()  # (N, N) orthogonal rows: dissimilar windows (mean 0)
    hidden[[0, 1, 4, 5]] = torch.eye(N)[0]  # similarity 1
    for i, token in enumerate([at(0, 0), at(0, 1), at(1, 0), at(1, 1)]):
        hidden[token] = torch.eye(N)[1] * 10 + torch.eye(N)[2 + i]  # similarity 100/101
    return hidden


def test_mustdrop_merges_every_alike_window_into_its_last_cell_when_adaptive():
    s = vision_signals(N, **{"hidden@0": alike_hidden()})
    selection = make("mustdrop", window=2, adaptive=True).select_vision(s)
    merged = {5: [0, 1, 4, 5], at(1, 1): [at(0, 0), at(0, 1), at(1, 0), at(1, 1)]}
    assert len(selection.keep) == N - 6
    for owner, members in merged.items():
        assert selection.groups[members].tolist() == [owner] * 4
        row = selection.keep.tolist().index(owner)
        weights = selection.weights.to_dense()[row]
        assert weights.nonzero()[:, 0].tolist() == members and torch.allclose(weights[members], torch.tensor(0.25))
    assert selection.maps["window similarity"][0] == 1.0 and selection.maps["window similarity"][2] == 0.0
    assert selection.stats["MustDrop before the LLM"]["windows merged"] == 2
    higher = make("mustdrop", window=2, adaptive=True, similarity=0.995).select_vision(s)  # 100/101 is below it
    assert higher.groups[[0, 1, 4]].tolist() == [5, 5, 5] and higher.groups[at(0, 0)] == at(0, 0)


def test_mustdrop_merges_the_most_alike_windows_first_and_never_below_the_budget():
    s = vision_signals(N - 3, **{"hidden@0": alike_hidden()})  # room for one merge of a 2x2 window (3 tokens)
    selection = make("mustdrop", window=2).select_vision(s)
    assert len(selection.keep) == N - 3 and selection.groups[[0, 1, 4]].tolist() == [5, 5, 5]
    s = vision_signals(N - 2, **{"hidden@0": alike_hidden()})
    assert len(make("mustdrop", window=2).select_vision(s).keep) == N


def test_mustdrop_key_set_is_the_top_of_the_last_layers_cls_attention_members_averaged():
    cls = torch.zeros(N)
    cls[[0, 1, 4, 5]] = torch.tensor([0.8, 0.0, 0.0, 0.0])  # merged into 5: mean 0.2
    cls[at(2, 2)], cls[at(6, 6)], cls[3] = 0.5, 0.3, 0.1
    cls[toy_geometry().partition == 5] = math.nan
    s = vision_signals(N - 3, **{"hidden@0": alike_hidden(), "cls@last": cls})
    # 85 kept, 77 of them patches: ceil(0.04 * 77) = 4 -> 0.5, 0.3, 0.2 (the merged window), 0.1
    selection = make("mustdrop", window=2, key_share=0.04).select_vision(s)
    assert selection.maps["key set"].nonzero()[:, 0].tolist() == sorted([at(2, 2), at(6, 6), 5, 3])
    assert selection.scores[5] == pytest.approx(0.2)
    tight = make("mustdrop", window=2, key_share=0.5).select_vision(vision_signals(3))  # never more than the budget
    assert int(tight.maps["key set"].sum()) == 3


# --- MustDrop: inside the LLM ---------------------------------------------------------------------


def dual_attention() -> torch.Tensor:
    """(1 head, 2 text tokens, N): token 10 gets 0.02 from the first text token only (the highest
    peak), tokens 20-29 get 0.015 from each (the highest totals), every other token 0.01 from each."""
    attention = torch.full((1, 2, N), 0.01)
    attention[0, :, 10] = torch.tensor([0.02, 0.0])
    attention[0, :, 20:30] = 0.015
    return attention


def test_mustdrop_drops_a_token_only_when_both_its_share_and_its_peak_are_low():
    # totals: 0.02 (token 10), 0.03 (20-29), 0.02 (the other 77): 1.86 in all, so the shares are
    # 0.0108, 0.0161 and 0.0108; peaks 0.02, 0.015 and 0.01. Thresholds 0.015 (share) and 0.018
    # (peak): 20-29 stay by their share, 10 by its peak, the rest go
    method = make("mustdrop", adaptive=True, global_threshold=0.015, individual_threshold=0.018)
    s = llm_signals(N, dual_attention())
    selection = method.select(s)
    assert selection.keep.tolist() == [10, *range(20, 30)]
    assert selection.scores[10] == pytest.approx(0.02 / 0.018)  # its peak over the individual threshold
    assert selection.scores[20] == pytest.approx(0.03 / 1.86 / 0.015)  # its share over the global one
    assert selection.scores[0] == pytest.approx(0.02 / 1.86 / 0.015)
    key = torch.zeros(N)
    key[[40, 70]] = 1.0  # the key set stays whatever its attention
    assert method.select(llm_signals(N, dual_attention(), **{"key set": key})).keep.tolist() == [
        10,
        *range(20, 30),
        40,
        70,
    ]


def test_mustdrop_budget_mode_keeps_the_key_set_then_the_top_of_the_rest():
    key = torch.zeros(N)
    key[[40, 70]] = 1.0
    alive = torch.ones(N, dtype=torch.bool)
    alive[30:35] = False
    attention = dual_attention()
    attention[..., ~alive] = math.nan
    s = llm_signals(5, attention, alive, **{"key set": key})
    assert make("mustdrop").select(s).keep.tolist() == [10, 20, 21, 40, 70]  # ties to the lower index
    s = llm_signals(2, attention, alive, **{"key set": key})
    assert make("mustdrop").select(s).keep.tolist() == [40, 70]


def test_mustdrop_cuts_after_its_layers_falling_geometrically_to_the_budget():
    cuts = [(c.layer, c.score_layer, c.tokens) for c in make("mustdrop").cuts(32, 2000, 125)]
    assert cuts == [(3, 2, 1000), (7, 6, 500), (11, 10, 250), (15, 14, 125)]  # (125 / 2000) ** (1/4) = 1/2
    cuts = [(c.layer, c.score_layer, c.tokens) for c in make("mustdrop").cuts(4, 400, 100)]
    assert cuts == [(1, 0, 200), (2, 1, 100)]  # 2, 6 -> layer 0 and 10, 14 -> layer 1 of 4
    assert [c.tokens for c in make("mustdrop", adaptive=True).cuts(32, 2000, 125)] == [2000] * 4  # at most
    with pytest.raises(ExplorerError, match="mustdrop: layers must be"):
        make("mustdrop", layers="6,2").cuts(32, 100, 10)


# --- MustDrop: end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"similarity": 0.8}, {"similarity": -1.0}])  # -1: every window may merge
def test_mustdrop_meets_the_budget_and_its_key_set_survives_every_cut(backend, settings):
    settings = {**settings, **AFTER}
    result = run(backend, photo(640, 480, seed=5), PROMPT, "mustdrop", 0.2, settings=settings, max_new_tokens=2)
    n, b = 2340, 468
    assert result.tokens["visual_kept"] == len(result.selection.keep) == b
    key = result.selection.maps["key set"].nonzero()[:, 0]
    assert 0 < len(key) <= b and torch.isin(key, result.selection.keep).all()
    for layer in ("layer 2", "layer 6", "layer 10", "layer 14"):  # scored (alive) at every cut: 2, 6, 10, 14 of 32
        assert result.selection.maps[layer][key].isfinite().all()
    merged = result.selection.stats["MustDrop before the LLM"]["windows merged"]
    assert result.tokens["visual_entering"] == n - 8 * merged
    if settings["similarity"] == -1.0:
        assert result.tokens["visual_entering"] == b  # merging went as far as the budget allows
    groups = result.selection.groups
    assert torch.equal(groups[result.selection.keep], result.selection.keep)


def test_mustdrop_adaptive_keeps_what_its_thresholds_keep(backend):
    settings = {"adaptive": True, "global_threshold": 0.0004, "individual_threshold": 0.002}
    result = run(backend, photo(640, 480, seed=5), PROMPT, "mustdrop", 0.2, settings=settings, max_new_tokens=1)
    assert result.budget is None and result.tokens["adaptive"] and result.tokens["visual_budget"] is None
    scores, keep = result.selection.scores, result.selection.keep
    key = result.selection.maps["key set"] > 0
    alive = scores.isfinite()  # scored at the last cut
    expected = (alive & ((scores >= 1) | key)).nonzero()[:, 0]
    assert torch.equal(keep, expected) and [c["kept"] for c in result.tokens["llm_cuts"]][-1] == len(keep)


def test_mustdrop_keeping_everything_is_the_unreduced_model(backend):
    image = photo(336, 336, seed=5)
    full = run(backend, image, PROMPT, "none", max_new_tokens=8)
    everything = run(backend, image, PROMPT, "mustdrop", 1.0, max_new_tokens=8)
    assert everything.answer_ids == full.answer_ids
    assert everything.tokens["visual_kept"] == everything.tokens["visual_full"]


def seen_by_the_llm(backend, image, method: str, budget: float, settings: dict):
    """A one-token run, and the visual rows of the LLM's input embeddings in its prefill."""
    embeds = []
    hook = backend.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"][0]), with_kwargs=True
    )
    try:
        result = run(backend, image, PROMPT, method, budget, settings=settings, max_new_tokens=1)
    finally:
        hook.remove()
    return result, embeds[0]


def expected_merge(backend, image, method: str, settings: dict, budget: int):
    """The method's vision step on the model's signals, and the (K, D) LLM inputs it should give:
    each kept token the projection of its group's mean encoder output, computed here by hand."""
    prepared = backend.prepare(image, PROMPT)
    chosen = make(method, **settings)
    with torch.no_grad():
        features, signals = backend.encode(prepared, (*chosen.vision_needs, "hidden@feature"))
        before = chosen.select_vision(Signals(prepared.geometry, budget, signals))
        hidden, expected = signals["hidden@feature"], features.clone()
        for t in before.keep.tolist():
            group = before.groups == t
            if group.sum() > 1:
                expected[t] = backend.model.model.multi_modal_projector(hidden[group].mean(0))
    ids = backend.generate_inputs(prepared, features, before.keep)["input_ids"][0]
    return before, expected[before.keep], ids == backend.model.config.image_token_id


def test_mustdrop_merged_windows_reach_the_llm_as_their_projected_mean(backend):
    image, settings = photo(640, 480, seed=9), {"similarity": -1.0, **AFTER}
    result, prefill = seen_by_the_llm(backend, image, "mustdrop", 0.2, settings)
    before, expected, visual = expected_merge(backend, image, "mustdrop", settings, 468)
    assert len(before.keep) == result.tokens["visual_entering"] == 468 < 2340
    assert (torch.bincount(before.groups, minlength=2340) == 9).sum() == (2340 - 468) // 8  # 3x3 windows
    torch.testing.assert_close(prefill[visual], expected)
    groups = result.selection.groups  # the groups whose owner survived the cuts inside the LLM, as merged
    assert torch.equal(groups[groups >= 0], before.groups[groups >= 0])
    assert (groups >= 0).sum() > len(result.selection.keep)


def test_mustdrop_is_explained_and_shows_its_steps(backend):
    text = vis.explain("mustdrop")
    assert "Differs from the paper" in text and "key set" in text and "decode stage" in text
    assert "It acts before the language model and inside it" in text
    result = run(
        backend, photo(640, 480, seed=5), PROMPT, "mustdrop", 0.2, settings={"similarity": -1.0}, max_new_tokens=1
    )
    captions = [caption for _, caption in teach.steps(photo(640, 480, seed=5), result)]
    assert any(c.startswith(teach.CAPTIONS["key set"]) for c in captions)
    assert any(c.startswith(teach.CAPTIONS["window similarity"]) for c in captions)
    assert any(c.startswith("Merge groups") for c in captions)


@pytest.mark.parametrize("method, settings", [("mustdrop", {"similarity": -1.0}), ("aim", {})])
def test_fidelity_scores_an_answer_under_both_stages(backend, method, settings):
    from explorer.engine.fidelity import logprobs

    image = photo(400, 300, seed=6)
    reduced = run(backend, image, PROMPT, method, 0.1, settings=settings, max_new_tokens=6)
    assert reduced.tokens["visual_entering"] < reduced.tokens["visual_full"]  # the first step reduced
    mine = logprobs(backend, image, PROMPT, reduced.answer_ids, method, 0.1, settings)
    assert mine.argmax(-1).tolist() == list(reduced.answer_ids)  # its own greedy choices
    full = logprobs(backend, image, PROMPT, reduced.answer_ids)
    assert torch.equal(logprobs(backend, image, PROMPT, reduced.answer_ids, method, 1.0, settings), full)


# --- AIM ------------------------------------------------------------------------------------------


def test_aim_merges_before_the_llm_to_the_geometric_mean_of_n_and_the_budget():
    s = vision_signals(22)  # N = 88, B = 22: M = 88 * (22 / 88) ** 0.5 = 44
    selection = make("aim").select_vision(s)
    assert len(selection.keep) == 44 and make("aim").entering(88, 22) == 44
    assert make("aim", split=1.0).entering(88, 22) == 22 and make("aim", split=0.0).entering(88, 22) == 88
    groups, keep = selection.groups, selection.keep
    assert torch.equal(groups[keep], keep)
    weights = selection.weights.to_dense()  # (K, N): each kept token the mean of its group
    for row, token in enumerate(keep.tolist()):
        group = (groups == token).nonzero()[:, 0]
        torch.testing.assert_close(weights[row, group], torch.full((len(group),), 1 / len(group)))
    rounds = selection.maps["merged before the LLM"]
    assert (rounds[(groups >= 0) & (groups != torch.arange(N))] >= 1).all()


def test_aim_merges_the_most_alike_projected_tokens():
    # the thumbnail's share of M = 44 is 44 * 16 / 80 = 8.8 -> 9 (largest remainder): 7 of its 16 merge.
    # Round 1 pairs A = 0, 2, 4, ... with B = 1, 3, 5, ...; 0 and 1, 2 and 3, ..., 12 and 13 are the
    # same vector: those 7 pairs merge first
    features = torch.randn(N, 8, generator=torch.Generator().manual_seed(3))
    for a in range(0, 14, 2):
        features[a] = features[a + 1]
    selection = make("aim").select_vision(vision_signals(22, features=features))
    assert selection.groups[:14].tolist() == [1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13]
    assert selection.groups[14:16].tolist() == [14, 15]


def test_aim_prunes_on_a_linear_schedule_from_what_entered_to_the_budget():
    cuts = [(c.layer, c.score_layer, c.tokens) for c in make("aim").cuts(28, 1000, 200)]
    assert cuts == [(15 + i, 14 + i, 1000 - 100 * (i + 1)) for i in range(8)]  # 900, 800, ..., 200
    cuts = [(c.layer, c.score_layer, c.tokens) for c in make("aim").cuts(4, 1046, 468)]
    assert cuts == [(3, 2, 468)]  # 4 layers: 14-21 of 28 all fall on layer 2
    cuts = [(c.layer, c.score_layer, c.tokens) for c in make("aim", start=7, stop=14).cuts(4, 1046, 468)]
    assert cuts == [(2, 1, 1046 - 578 * 7 // 8), (3, 2, 468)]  # layers 7-13 -> 1, the last step on 14 -> 2
    with pytest.raises(ExplorerError, match="aim: start"):
        make("aim", start=9, stop=3).cuts(28, 100, 10)


def test_aim_importance_is_the_sharpened_attention_renormalised_over_the_image_by_hand():
    attention = torch.zeros(1, 1, N)
    attention[0, 0, 3], attention[0, 0, 7] = 0.5, 0.25  # the rest goes to text tokens
    plain = make("aim", temperature=1.0).select(llm_signals(1, attention))
    assert plain.scores[3] == pytest.approx(2 / 3) and plain.scores[7] == pytest.approx(1 / 3)
    sharp = make("aim", temperature=0.5).select(llm_signals(1, attention))  # squared: 0.25 and 0.0625
    assert sharp.scores[3] == pytest.approx(0.8) and sharp.scores[7] == pytest.approx(0.2)
    assert sharp.keep.tolist() == [3]
    two = torch.cat([attention, attention.flip(-1)])  # a second head that looks at 80 and 84 instead
    scores = make("aim", temperature=0.5).select(llm_signals(2, two)).scores
    assert scores[3] == pytest.approx(0.8 / math.sqrt(2))  # the root mean square over the heads


def test_aim_meets_the_budget_and_follows_its_schedule_end_to_end(backend):
    image = photo(640, 480, seed=5)
    result = run(backend, image, PROMPT, "aim", 0.2, settings={"start": 7, "stop": 14, **AFTER}, max_new_tokens=2)
    assert result.tokens["visual_entering"] == math.floor(2340 * 0.2**0.5) == 1046
    # layers 7-14 of 28 scaled to 32 (l * 32 // 28): 8, 9, ..., 14 and 16, each cutting before the next layer,
    # linear from the 1046 that enter to 468: 1046 - 578 i // 8 for i = 1..8
    cuts = [(9, 974), (10, 902), (11, 830), (12, 757), (13, 685), (14, 613), (15, 541), (17, 468)]
    assert [(c["layer"], c["kept"]) for c in result.tokens["llm_cuts"]] == cuts
    assert result.tokens["visual_kept"] == len(result.selection.keep) == 468
    mean = (9 * 1046 + 974 + 902 + 830 + 757 + 685 + 613 + 2 * 541 + 15 * 468) / 32  # layers 0-8 see all 1046
    assert result.tokens["visual_layer_mean"] == mean == 696.15625


def test_aim_keeping_everything_is_the_unreduced_model(backend):
    image = photo(336, 336, seed=5)
    full = run(backend, image, PROMPT, "none", max_new_tokens=8)
    everything = run(backend, image, PROMPT, "aim", 1.0, max_new_tokens=8)
    assert everything.answer_ids == full.answer_ids
    assert everything.tokens["visual_entering"] == everything.tokens["visual_kept"] == everything.tokens["visual_full"]


def test_aim_merged_tokens_reach_the_llm_as_their_projected_mean(backend):
    image = photo(640, 480, seed=9)
    result, prefill = seen_by_the_llm(backend, image, "aim", 0.2, AFTER)
    before, expected, visual = expected_merge(backend, image, "aim", AFTER, 468)
    assert len(before.keep) == result.tokens["visual_entering"] == 1046
    torch.testing.assert_close(prefill[visual], expected)


def test_aim_is_explained_and_shows_its_steps(backend):
    text = vis.explain("aim")
    assert "Differs from the paper" in text and "PageRank" in text
    assert "It acts before the language model and inside it" in text
    result = run(backend, photo(640, 480, seed=5), PROMPT, "aim", 0.2, max_new_tokens=1)
    captions = [caption for _, caption in teach.steps(photo(640, 480, seed=5), result)]
    assert any(c.startswith(teach.CAPTIONS["merged before the LLM"]) for c in captions)
    assert any(c.startswith("Merge groups") for c in captions)
