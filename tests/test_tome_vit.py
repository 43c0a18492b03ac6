"""ToMe inside the vision tower (tome-vit): the matching, the fold and the schedule by hand, then the
encoder's real blocks: shorter sequences, size-weighted means, proportional attention, and the tokens
that reach the LLM."""

import types

import pytest
import torch
from conftest import photo, run_seeing_embeds
from test_families import loaded
from test_seed_methods import tome_keys

from backends.encoder_merge import Merging, fold, merged, merging
from explorer import Budget, ExplorerError, make, run
from explorer.methods.tome import bipartite_match
from explorer.methods.tome_vit import constant

PROMPT = "What is shown in this image?"


def test_bipartite_match_pairs_the_best_matched_a_rows_by_hand():
    # A = 0, 2, 4 and B = 1, 3, 5; best partners 0->1 (10 deg), 2->5 (5 deg), 4->3 (80 deg)
    src, dst = bipartite_match(tome_keys(), 2)
    assert src.tolist() == [2, 0] and dst.tolist() == [5, 1]
    src, dst = bipartite_match(tome_keys()[[1, 3, 5]], 1)  # A = 10 and 95 deg, B = 100 deg: 95 -> 100
    assert src.tolist() == [2] and dst.tolist() == [1]


def test_fold_makes_each_row_the_size_weighted_mean_of_what_it_holds():
    x = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 6.0], [9.0, 9.0]])
    size = torch.tensor([1.0, 2.0, 3.0, 1.0])
    merged, sizes, stay = fold(x, size, torch.tensor([0, 2]), torch.tensor([1, 1]))
    # row 1 holds 1 + 2 + 3 = 6 tokens: (1 * [1, 0] + 2 * [3, 3] + 3 * [0, 6]) / 6 = [7/6, 4]
    torch.testing.assert_close(merged, torch.tensor([[7 / 6, 4.0], [9.0, 9.0]]))
    assert sizes.tolist() == [6.0, 1.0] and stay.tolist() == [False, True, False, True]


def test_the_constant_schedule_spreads_the_merges_evenly():
    assert constant(10, 4) == [2, 2, 3, 3]
    assert constant(3, 3) == [1, 1, 1] and constant(0, 2) == [0, 0] and constant(2, 5) == [0, 0, 0, 1, 1]


# --- in the encoder's blocks ----------------------------------------------------------------------


def first_crop(backend, seed: int = 3):
    """The thumbnail of a photo as the encoder takes it, (1, 3, 336, 336)."""
    return backend.crops(backend.prepare(photo(640, 480, seed=seed), PROMPT))[:1]


def encoder_pass(backend, pixels, merges: int, rounds: list[int], proportional: bool = True):
    """One merging pass over one crop; returns the trace, each block's raw output (before merging)
    and the hidden states and attention mask each block received."""
    layers, last = backend.encoder, backend.feature_layer
    raw, received = {}, {}
    plan = Merging([], bipartite_match, lambda m, blocks: rounds, proportional)
    capture = [  # registered before the merging hooks: they see the block's own output
        layer.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(i, out[0].clone()))
        for i, layer in enumerate(layers)
    ]
    mergeable = torch.ones(1, 577, dtype=torch.bool)
    mergeable[0, 0] = False  # [CLS]
    try:
        with torch.no_grad(), merging(layers, last, mergeable, merges, plan) as (trace,):
            seen = [  # registered after: they see what the merging hands each block
                layer.register_forward_pre_hook(
                    lambda m, args, i=i: received.__setitem__(i, (args[0][0].clone(), args[1]))
                )
                for i, layer in enumerate(layers)
            ]
            backend.vision_tower(pixels)
    finally:
        for handle in capture + seen:
            handle.remove()
    return trace, raw, received


def test_a_block_hands_on_fewer_tokens_each_the_mean_of_its_members_with_their_sizes(backend):
    """Merging 200 patches after block 0: block 1 gets 377 rows, each the mean of the block-0 outputs
    of the patches it holds, and log(size) as its attention mask (proportional attention)."""
    assert backend.feature_layer == 1  # the tiny CLIP: 3 blocks, features from block 1
    trace, raw, received = encoder_pass(backend, first_crop(backend), 200, [200, 0])
    hidden, mask = received[1]
    assert hidden.shape[0] == 377 == received[2][0].shape[0] and received[0][0].shape[0] == 577
    size = torch.bincount(trace.owner, minlength=377).float()  # (377,) patches per row
    expected = torch.zeros(377, raw[0].shape[-1]).index_add_(0, trace.owner, raw[0]) / size[:, None]
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(size, trace.size) and size.sum() == 577 and size.max() > 1
    torch.testing.assert_close(mask, size.log()[None, None, None, :])
    assert trace.owner[0] == 0 and size[0] == 1  # [CLS] is never merged
    assert received[0][1] is None  # the first block sees every patch once: no bias
    assert (trace.merged_after >= 0).sum() == 200 and set(trace.merged_after.tolist()) == {-1, 0}
    assert torch.equal(trace.origin[trace.owner[trace.origin]], trace.origin)  # a row began as its own token
    torch.testing.assert_close(trace.output, raw[1])  # nothing merged after the feature block


def test_merges_after_the_feature_block_fold_its_output_by_size(backend):
    """100 merges after block 0, 200 after block 1 (the feature block): the output is 277 rows, each
    the size-weighted mean of the block-1 rows it holds, that is the mean over its patches."""
    pixels = first_crop(backend)
    trace, raw, received = encoder_pass(backend, pixels, 300, [100, 200], proportional=False)
    assert received[1][0].shape[0] == 477 and received[1][1] is None  # no bias without proportional attention
    assert trace.output.shape[0] == 277 == received[2][0].shape[0]
    assert (trace.merged_after == 0).sum() == 100 and (trace.merged_after == 1).sum() == 200
    first, _, _ = encoder_pass(backend, pixels, 100, [100, 0], proportional=False)  # the same block 0
    per_patch = raw[1][first.owner]  # (577, C): the block-1 row that held each patch
    expected = torch.zeros_like(trace.output).index_add_(0, trace.owner, per_patch) / trace.size[:, None]
    torch.testing.assert_close(trace.output, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.bincount(trace.owner, minlength=277).float(), trace.size)


def test_a_merge_plan_that_leaves_nothing_or_runs_flash_attention_is_refused(backend):
    mergeable = torch.ones(1, 5, dtype=torch.bool)
    plan = Merging([], bipartite_match, constant)
    with pytest.raises(ExplorerError, match="cannot merge 5 of the 5 tokens of a crop"):
        with merging(backend.encoder, 1, mergeable, 5, plan):
            pass
    flash = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ExplorerError, match="needs sdpa or eager attention"):
        with merging([types.SimpleNamespace(self_attn=flash)], 0, mergeable, 1, plan):
            pass


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.2, Budget(tokens=2)])
def test_each_partition_keeps_its_share_and_groups_stay_inside_it(backend, budget):
    result = run(backend, photo(640, 480, seed=5), PROMPT, "tome-vit", budget, max_new_tokens=1)
    s, g = result.selection, result.geometry
    assert result.tokens["visual_kept"] == len(s.keep) == (468 if budget == 0.2 else 2)
    kept = torch.bincount(g.partition[s.keep], minlength=len(g.names)).tolist()
    assert kept == [s.budgets[name] for name in g.names]
    assert torch.equal(s.groups[s.keep], s.keep)
    grouped = (s.groups >= 0).nonzero()[:, 0]
    assert torch.equal(g.partition[s.groups[grouped]], g.partition[grouped])  # no group spans two crops
    after = s.maps["merged after block"]  # NaN where a patch's own row reached the end: the kept ones
    shared = torch.tensor([s.budgets[name] > 0 and name != "newline" for name in g.names])[g.partition]
    assert torch.equal(after[shared].isnan(), (s.groups == torch.arange(len(g)))[shared])


@pytest.mark.parametrize("name, kept", [("tiny-llava-next", 468), ("tiny-llava-onevision", 585)])
def test_the_llm_gets_each_groups_merged_row_which_all_its_patches_carry(name, kept):
    """On LLaVA-NeXT (CLIP, [CLS]) and LLaVA-OneVision (SigLIP, none) alike."""
    backend, image = loaded(name), photo(640, 480, seed=9)
    result, embeds = run_seeing_embeds(backend, image, PROMPT, "tome-vit", 0.2)
    keep, groups = result.selection.keep, result.selection.groups
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        plan = make("tome-vit").merging(prepared.geometry, result.tokens["visual_budget"])
        hidden = merged(backend, prepared, plan)["hidden@feature"]  # (N, C)
        expected = backend.project(hidden[keep])  # (K, D)
    ids = prepared.inputs["input_ids"][0, backend.staying(prepared, keep)]
    received = embeds[0][ids == backend.model.config.image_token_id]
    assert received.shape[0] == kept == result.tokens["visual_budget"]
    torch.testing.assert_close(received, expected)
    members = (groups >= 0).nonzero()[:, 0]
    torch.testing.assert_close(hidden[members], hidden[groups[members]])
    assert len(groups[members].unique()) == kept < len(members)


def test_onevision_refuses_an_image_whose_grid_it_resamples():
    backend = loaded("tiny-llava-onevision")
    assert backend.one_patch_each(backend.prepare(photo(1100, 800), PROMPT))  # 5567 tokens, one patch each
    with pytest.raises(ExplorerError, match="resamples the grid of an image this large"):
        run(backend, photo(1920, 1080), PROMPT, "tome-vit", 0.2, max_new_tokens=1)  # 7269 resampled tokens
    assert run(backend, photo(1920, 1080), PROMPT, "tome", 0.2, max_new_tokens=1).tokens["visual_kept"] == 1453


@pytest.mark.parametrize("size, passes", [((672, 672), [5]), ((640, 480), [1, 2, 1, 1])])
def test_the_encoder_runs_on_fewer_tokens_block_after_block_alike_crops_side_by_side(backend, size, passes):
    """A square image's thumbnail and four crops have the same patches and budgets: one pass. At 4:3
    the thumbnail passes alone, the top crops (padding above, 88 tokens each) together, and the
    bottom crops (padding below) apart, since one keeps 88 tokens and the other 87."""
    lengths = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: lengths.append((i, *args[0].shape[:2])))
        for i, layer in enumerate(backend.encoder)
    ]
    try:
        run(backend, photo(*size, seed=5), PROMPT, "hired", 0.2, max_new_tokens=1)
        unmerged, lengths[:] = list(lengths), []
        run(backend, photo(*size, seed=5), PROMPT, "tome-vit", 0.2, max_new_tokens=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert unmerged == [(0, 5, 577), (1, 5, 577), (2, 5, 577)]  # the thumbnail and four crops, side by side
    assert [(block, crops) for block, crops, _ in lengths] == [(b, n) for n in passes for b in range(3)]
    for i in range(len(passes)):
        tokens = [t for _, _, t in lengths[3 * i : 3 * i + 3]]
        assert tokens[0] == 577 > tokens[1] > tokens[2]
