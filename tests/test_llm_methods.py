"""Methods that prune inside the LLM (FastV, PyramidDrop, DART, SparseVLM): the sequence really gets
shorter after the cut, the cache stays consistent while decoding, keeping everything changes nothing,
the recomputed attention equals eager attention, and each method's rule on synthetic signals. Where a
test needs a cut's count, it counts the budget after the cuts (`budget_after_cuts`); as a layer mean it
would depend on the depth (the tiny model's 32 layers, LLaVA-1.6-7B's), the layers before a cut seeing every
token."""

import copy
import json

import pytest
import torch
import transformers
from conftest import first_layers, photo, toy_geometry

from backends.llava_next import LlavaNext
from explorer import METHODS, ExplorerError, Signals, make, run, stream
from explorer.engine.fidelity import logprobs
from explorer.engine.llm import LlmStage
from explorer.views import teach
from explorer.views import visual as vis

PROMPT = "What is shown in this image?"
LLM = [name for name, method in METHODS.items() if method.stage == "llm" and "clip" not in method.requires]  # on images
CASES = [("fastv", {}), ("fastv", {"keep_positions": False}), ("pdrop", {}), ("dart", {}), ("sparsevlm", {})]
CASES += [("mustdrop", {"compact_cache": False})]  # its decode stage off: every layer keeps what its prefill left
AFTER = {"budget_after_cuts": True}  # the budget is what the last cut leaves


@pytest.fixture(scope="module")
def eager(backend):
    """The tiny model with the same weights and eager attention (it materialises every mask)."""
    model = copy.deepcopy(backend.model)
    model.set_attn_implementation("eager")
    return LlavaNext(model, backend.processor, "tiny-llava-next (eager)", random_weights=True)


@pytest.fixture(scope="module")
def gqa(backend):
    """A tiny model whose 4 query heads share 2 key/value heads, with SDPA and, same weights, eager."""
    config = copy.deepcopy(backend.model.config)
    config.text_config.num_key_value_heads = 2
    torch.manual_seed(1)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return LlavaNext(model, backend.processor, "tiny-gqa", random_weights=True), eager


@pytest.fixture(scope="module")
def unreduced(backend):
    """An image, the prompt's generate() inputs, and the unreduced model's logits and answer."""
    image = photo(336, 336, seed=5)
    prepared, inputs = inputs_of(backend, image)
    with torch.no_grad():
        logits = backend.model(**inputs).logits
    return image, prepared, inputs, logits, run(backend, image, PROMPT, "none", max_new_tokens=8).answer_ids


def inputs_of(backend, image):
    """The prompt with every visual token, as the pipeline hands it to generate()."""
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, _ = backend.encode(prepared, ())
    return prepared, backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))


def hooks(backend, prepared, name: str, budget: int, **settings):
    method = make(name, **settings)
    stage = LlmStage(name, method, prepared.geometry, budget, backend.depth)
    return stage, backend.pruning(
        prepared, stage.pairs, method.needs, stage.choose, method.keep_positions, compact_from=stage.compact_from
    )


def generate(backend, inputs, tokens: int):
    return backend.model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=backend.tokenizer.pad_token_id,
    )


# --- on the tiny model ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, settings", CASES)
def test_keeping_every_token_equals_the_unreduced_model_exactly(backend, unreduced, name, settings):
    image, prepared, inputs, logits, answer = unreduced
    n = len(prepared.geometry)
    stage, pruning = hooks(backend, prepared, name, n, **settings)
    with torch.no_grad(), pruning:
        kept = backend.model(**inputs).logits
    assert stage.done and torch.equal(kept, logits)
    everything = run(backend, image, PROMPT, name, 1.0, settings=settings, max_new_tokens=8)
    assert everything.answer_ids == answer
    assert everything.tokens["visual_kept"] == n and everything.tokens["visual_layer_mean"] == n


RENUMBERED, PDROP, SPARSEVLM, MUSTDROP = CASES[1], CASES[2], CASES[4], CASES[5]
MASKS = [(*case, "sdpa", False) for case in CASES]  # SDPA without a mask, the usual path
MASKS += [(*case, "sdpa", True) for case in (RENUMBERED, PDROP, SPARSEVLM, MUSTDROP)]  # materialised masks, 1+ cuts
MASKS += [(*case, "eager", True) for case in (CASES[0], RENUMBERED, PDROP)]  # eager: a mask every time


@pytest.mark.parametrize("name, settings, attention, masked", MASKS)
def test_decoding_on_the_pruned_cache_equals_rerunning_without_a_cache(
    backend, eager, name, settings, attention, masked
):
    model = backend if attention == "sdpa" else eager
    prepared, inputs = inputs_of(model, photo(336, 336, seed=2))
    length = inputs["input_ids"].shape[1]
    if masked:  # one prompt token hidden: the masks are materialised and must be cut like the cache
        inputs["attention_mask"] = inputs["attention_mask"].clone()
        inputs["attention_mask"][0, 1] = 0
    stage, pruning = hooks(model, prepared, name, len(prepared.geometry) // 5, **settings, **AFTER)
    with torch.no_grad(), pruning as record:
        out = generate(model, inputs, 3)
    new, keeps = out.sequences[0, length:], list(record.keeps)
    assert [len(k) for k in keeps] == [c.tokens for c in stage.cuts]

    for t in range(len(new)):  # the whole sequence so far, no cache, the same tokens cut
        ids = torch.cat([inputs["input_ids"], new[None, :t]], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(new[None, :t])], 1)
        positions = make(name, **settings).keep_positions
        replay = model.pruning(prepared, stage.pairs, (), lambda cut, maps, alive: keeps[cut], positions)
        with torch.no_grad(), replay:
            logits = model.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),  # as generate() numbers them
                mm_encoder_outputs=inputs["mm_encoder_outputs"],
                use_cache=False,
            ).logits[0, -1]
        torch.testing.assert_close(logits, out.logits[t][0], rtol=1e-4, atol=1e-4)
        assert logits.argmax() == new[t]


@pytest.mark.parametrize("name, settings", CASES)
def test_layers_after_a_cut_see_only_the_text_and_the_kept_tokens(backend, name, settings):
    prepared, inputs = inputs_of(backend, photo(336, 336))
    n, text, depth = len(prepared.geometry), prepared.text_tokens, backend.depth
    layers = backend.model.model.language_model.layers
    seen = {layer: [] for layer in range(depth)}  # what each layer's MLP was given, pass by pass
    observers = [
        block.mlp.register_forward_hook(lambda module, args, out, layer=layer: seen[layer].append(out.shape[1]))
        for layer, block in enumerate(layers)
    ]
    stage, pruning = hooks(backend, prepared, name, n // 10, **settings, **AFTER)
    try:
        with torch.no_grad(), pruning:
            cache = generate(backend, inputs, 3).past_key_values
    finally:
        for observer in observers:
            observer.remove()
    visual = [n] * depth
    for cut in stage.cuts:
        visual[cut.layer :] = [cut.tokens] * (depth - cut.layer)
    assert visual[-1] == n // 10 and visual[0] == n and len(set(visual)) > 1
    for layer in range(depth):
        assert seen[layer] == [text + visual[layer], 1, 1]  # the prefill, then one new token per step
        assert cache.layers[layer].keys.shape[-2] == text + visual[layer] + 2


def test_recomputed_attention_rows_and_keys_match_the_model_with_grouped_query_heads(gqa):
    backend, eager = gqa
    assert backend.model.config.text_config.num_key_value_heads == 2
    prepared, inputs = inputs_of(backend, photo(336, 336, seed=3))
    signals = {}

    def keep_all(cut, maps, alive):
        signals[cut] = maps
        return alive.nonzero()[:, 0]

    cuts, scored = [(1, 0), (2, 1), (3, 3)], [0, 1, 3]  # scored by the layer before the cut, and by the cut layer
    with torch.no_grad(), backend.pruning(prepared, cuts, ("llm-attention", "llm-keys"), keep_all, True):
        cache = backend.model(**inputs, use_cache=True).past_key_values
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions  # per layer (1, H, L, L)
    ids = inputs["input_ids"][0]
    image = (ids == backend.model.config.image_token_id).nonzero()[:, 0]
    text = torch.arange(int(image.max()) + 1, len(ids))
    for cut, layer in enumerate(scored):
        expected = attentions[layer][0][:, text][:, :, image]  # (H, T, N)
        torch.testing.assert_close(signals[cut]["llm-attention"], expected)
        keys = cache.layers[layer].keys[0].transpose(0, 1).reshape(len(ids), -1)  # (L, H_kv * d) as cached
        torch.testing.assert_close(signals[cut]["llm-keys"], keys[image])
        torch.testing.assert_close(signals[cut]["llm-text-keys"], keys[text])


def test_fastv_on_the_model_keeps_the_top_of_the_last_tokens_eager_attention_row(backend, eager):
    prepared, inputs = inputs_of(backend, photo(336, 336, seed=4))
    stage, pruning = hooks(backend, prepared, "fastv", 100, **AFTER)
    with torch.no_grad(), pruning:
        backend.model(**inputs)
    with torch.no_grad(), first_layers(eager, 2):  # layer 1's maps are all that is read
        attentions = eager.model(**inputs, output_attentions=True).attentions
    image = (inputs["input_ids"][0] == backend.model.config.image_token_id).nonzero()[:, 0]
    row = attentions[1][0, :, -1, image].mean(0)  # layer K - 1 = 1, last prompt token, heads averaged
    assert torch.equal(stage.selection().keep, row.topk(100).indices.sort().values)
    torch.testing.assert_close(stage.selection().scores, row)


def test_a_batch_is_refused_with_the_reason(backend):
    prompts = [PROMPT, "Describe the photo."]
    texts = [
        backend.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    batch = backend.processor(
        images=[photo(640, 480), photo(336, 336, seed=1)], text=texts, padding=True, return_tensors="pt"
    )
    prepared, _ = inputs_of(backend, photo(640, 480))
    _, pruning = hooks(backend, prepared, "fastv", 100, **AFTER)
    handles = sum(len(block._forward_pre_hooks) for block in backend.model.model.language_model.layers)
    with pytest.raises(ExplorerError, match="one image and prompt at a time: each sequence would keep different"):
        with torch.no_grad(), pruning:
            backend.model(**batch)
    assert sum(len(block._forward_pre_hooks) for block in backend.model.model.language_model.layers) == handles


@pytest.mark.parametrize("name", LLM)
def test_stream_reports_the_cut_after_the_prefill(backend, name):
    image = photo(640, 480)
    results = list(stream(backend, image, PROMPT, name, 0.2, AFTER, max_new_tokens=3, min_new_tokens=3))
    assert [r.done for r in results] == [False, False, False, True]  # nothing before the prefill has chosen
    assert [len(r.answer_ids) for r in results] == [1, 2, 3, 3]
    final = results[-1]
    n, b, depth = 2340, 468, backend.depth  # 32 layers, LLaVA-1.6-7B's
    assert all(r.tokens["visual_kept"] == len(r.selection.keep) == b for r in results)
    assert all(r.selection is final.selection for r in results)
    cuts = final.tokens["llm_cuts"]
    assert cuts[-1]["kept"] == b and all(1 <= c["layer"] < depth for c in cuts)
    entering = final.tokens["visual_entering"]  # fewer than n when the method merged before the LLM
    visual = [entering] * depth
    for c in cuts:
        visual[c["layer"] :] = [c["kept"]] * (depth - c["layer"])
    assert final.tokens["visual_layer_mean"] == sum(visual) / depth
    if len(cuts) > 1:  # every cut's scores, by the layer that scored
        assert {f"layer {c['scored_at']}" for c in cuts} <= set(final.selection.maps)
    assert 0 < final.timing["selection_s"] and final.timing["prefill_s"] < final.timing["ttft_s"]
    if make(name).select_vision is None:  # the hooks' work is inside the prefill (a step before the LLM is not)
        assert final.timing["selection_s"] < final.timing["prefill_s"]
    scores = final.selection.scores
    alive_at_last_cut = cuts[-2]["kept"] if len(cuts) > 1 else entering
    assert scores.shape == (n,) and int(scores.isfinite().sum()) == alive_at_last_cut
    if name != "dart":  # the others keep the top scores of the layer that chose (MustDrop: besides its key set)
        ranked, dropped = final.selection.keep, scores.isfinite()
        dropped[ranked] = False
        if "key set" in final.selection.maps:
            ranked = ranked[final.selection.maps["key set"][ranked] == 0]
        assert scores[ranked].min() >= scores[dropped].max()
    json.dumps(final.to_json())


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("fastv", {"layer": 32}, r"fastv: cannot cut before layer\(s\) \[32\]: the LLM has 32 layers"),
        ("dart", {"layer": 40}, r"dart: cannot cut before layer\(s\) \[40\]"),
        ("sparsevlm", {"layers": "2,x"}, "sparsevlm: layers must be 1 to 3 rising layer numbers"),
        ("sparsevlm", {"layers": "6,2"}, "sparsevlm: layers must be 1 to 3 rising layer numbers"),
    ],
)
def test_layers_the_model_does_not_have_are_refused(backend, name, settings, message):
    with pytest.raises(ExplorerError, match=message):
        run(backend, photo(64, 64), PROMPT, name, 0.8, settings=settings, max_new_tokens=1)
    assert run(backend, photo(64, 64), PROMPT, name, 0.8, max_new_tokens=1).done


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_fidelity_scores_an_answer_under_the_model_pruned_inside(backend, name):
    image = photo(400, 300, seed=6)
    reduced = run(backend, image, PROMPT, name, 0.1, settings=AFTER, max_new_tokens=6)
    mine = logprobs(backend, image, PROMPT, reduced.answer_ids, name, 0.1, AFTER)
    assert mine.shape[0] == 6 and mine.argmax(-1).tolist() == list(reduced.answer_ids)  # its own greedy choices
    full = logprobs(backend, image, PROMPT, reduced.answer_ids)
    assert not torch.allclose(mine, full)  # the cut changes the model
    assert torch.equal(logprobs(backend, image, PROMPT, reduced.answer_ids, name, 1.0), full)  # keeping all does not


def test_the_app_shows_the_cuts_and_the_tokens_per_layer(backend):
    result = run(backend, photo(640, 480), PROMPT, "pdrop", 0.2, settings=AFTER, max_new_tokens=1)
    rows = {row[0]: row[1:] for row in vis.metrics(result)}
    # 2340 and the official int(2340 / 2^s) = 1170, 585, 292 scaled by 468 / 292: 1875, 937, 468, cut before
    # layers 8, 16 and 24 of 32: 8 layers each, a mean of (2340 + 1875 + 937 + 468) / 4 = 1405
    assert rows["visual tokens"][0] == "468" and rows["visual tokens per LLM layer, mean"][0] == "1405"
    assert vis.budget_figure(result).layout.title.text.endswith(", cut before LLM layer 8, 16, 24")
    captions = [caption for _, caption in teach.steps(photo(640, 480), result)]
    assert any(
        c.startswith("What reaches the LLM's layers from layer 24 on: 468 of 2340 visual tokens") for c in captions
    )
    assert any("its intermediate map “layer 8”" in c for c in captions)  # each cut's scores


def test_the_app_explains_what_each_llm_method_reads_and_where():
    text = vis.explain("fastv")
    assert "It reads the attention of the prompt's text to each visual token, at the LLM layer that scores." in text
    assert "It acts inside the language model" in text and "Differs from the paper" in text
    assert "the attention keys of the visual and text tokens" in vis.explain("dart")
    assert "input embeddings" in vis.explain("sparsevlm")


# --- the methods on synthetic signals -------------------------------------------------------------


def llm_signals(budget: int, alive=None, seed: int = 0, heads: int = 4, text: int = 5, dim: int = 16) -> Signals:
    """Signals at a cut, on the toy geometry (N = 88), with the tokens not alive cut earlier (NaN)."""
    g = toy_geometry()
    n = len(g)
    generator = torch.Generator().manual_seed(seed)
    alive = torch.ones(n, dtype=torch.bool) if alive is None else alive
    maps = {"llm-attention": torch.rand(heads, text, n, generator=generator)}
    for kind in ("keys", "hidden", "embeds"):
        maps[f"llm-{kind}"] = torch.randn(n, dim, generator=generator)
        maps[f"llm-text-{kind}"] = torch.randn(text, dim, generator=generator)
    maps["llm-transition"] = torch.rand(n, generator=generator)
    maps["llm-rope"] = 1 + torch.rand(text, n, generator=generator)  # positive, as near tokens' are
    maps["llm-positions"], maps["llm-text-positions"] = torch.arange(n) + 5, torch.arange(text) + n + 5
    for name in ("llm-keys", "llm-hidden", "llm-transition"):  # the input embeddings are read before any cut
        maps[name][~alive] = torch.nan
    maps["llm-attention"][:, :, ~alive] = torch.nan
    maps["llm-rope"][:, ~alive] = torch.nan
    return Signals(g, budget, maps, alive)


EVERY_OTHER = torch.arange(88) % 2 == 0


@pytest.mark.parametrize("name", LLM)
@pytest.mark.parametrize("budget, alive", [(1, None), (20, None), (88, None), (5, EVERY_OTHER), (44, EVERY_OTHER)])
def test_every_llm_method_keeps_its_count_of_alive_tokens(name, budget, alive):
    s = llm_signals(budget, alive)
    selection = make(name).select(s)
    keep = selection.keep
    assert len(keep) == budget and keep.dtype == torch.long and (keep.diff() > 0).all()
    assert s.alive[keep].all()
    assert torch.equal(make(name).select(llm_signals(budget, alive)).keep, keep)  # deterministic
    assert selection.scores.shape == (88,) and selection.scores[~s.alive].isnan().all()


def test_fastv_keeps_exactly_the_top_of_the_last_prompt_tokens_row():
    s = llm_signals(20)
    expected = s["llm-attention"][:, -1].mean(0).topk(20).indices.sort().values
    assert torch.equal(make("fastv").select(s).keep, expected)
    s["llm-attention"][:, :-1] = torch.rand(4, 4, 88)  # the other text rows do not matter
    assert torch.equal(make("fastv").select(s).keep, expected)
    s = llm_signals(20, EVERY_OTHER)
    row = s["llm-attention"][:, -1].mean(0)
    assert torch.equal(make("fastv").select(s).keep, row.nan_to_num(-1).topk(20).indices.sort().values)


def test_pdrop_ranks_by_the_last_prompt_token_like_fastv():
    s = llm_signals(30, EVERY_OTHER)
    assert torch.equal(make("pdrop").select(s).keep, make("fastv").select(s).keep)


def cuts_of(name: str, depth: int, n: int, budget: int, **settings) -> list[tuple[int, int, int]]:
    return [(c.layer, c.score_layer, c.tokens) for c in make(name, **settings).cuts(depth, n, budget)]


def test_pdrop_stages_follow_its_schedule_rescaled_to_the_budget():
    assert cuts_of("pdrop", 32, 2928, 366) == [(8, 8, 1464), (16, 16, 732), (24, 24, 366)]  # 1/2, 1/4, 1/8 of N
    assert cuts_of("pdrop", 32, 2928, 585) == [(8, 8, 2340), (16, 16, 1170), (24, 24, 585)]  # budget 0.2
    assert cuts_of("pdrop", 32, 2928, 1464) == [(8, 8, 2928), (16, 16, 2928), (24, 24, 1464)]  # capped at N
    assert cuts_of("pdrop", 40, 1000, 10, stages=2, ratio=0.25) == [(13, 13, 40), (26, 26, 10)]
    assert cuts_of("pdrop", 8, 100, 12) == [(2, 2, 50), (4, 4, 25), (6, 6, 12)]  # the official int(100 / 2^s)
    assert cuts_of("pdrop", 8, 100, 24) == [(2, 2, 100), (4, 4, 50), (6, 6, 24)]  # scaled by 24 / 12
    assert cuts_of("pdrop", 2, 100, 12) == [(1, 1, 12)]  # too shallow for three stages: they merge


def test_dart_keeps_its_pivots_and_the_tokens_least_like_them():
    s = llm_signals(20)
    pivots = torch.tensor([7, 30, 51, 80])
    s["llm-keys"][pivots] *= 10  # the largest L1 norms
    keep = make("dart").select(s).keep
    assert torch.isin(pivots, keep).all() and len(keep) == 20
    two = make("dart").select(Signals(s.geometry, 2, s.maps, s.alive)).keep  # fewer than the pivots
    assert two.tolist() == sorted(pivots[s["llm-keys"][pivots].abs().sum(1).topk(2).indices].tolist())

    one = make("dart", image_pivots=1, text_pivots=0).select(Signals(s.geometry, 5, s.maps, s.alive)).keep
    pivot = int(s["llm-keys"].abs().sum(1).argmax())
    unit = torch.nn.functional.normalize(s["llm-hidden"], dim=-1)
    similarity = unit @ unit[pivot]
    similarity[pivot] = torch.inf
    assert one.tolist() == sorted([pivot, *similarity.topk(4, largest=False).indices.tolist()])


def test_sparsevlm_rates_with_the_text_tokens_the_image_points_to():
    s = llm_signals(10, heads=2)
    s["llm-rope"][:] = 1.0  # no correction
    s["llm-embeds"][:] = 1.0
    s["llm-text-embeds"][:] = 0.0
    s["llm-text-embeds"][[1, 3]] = 0.5  # the visual tokens point to text tokens 1 and 3
    rated = torch.zeros(88)
    rated[torch.arange(5, 88, 9)] = 1.0  # what raters 1 and 3 attend to
    s["llm-attention"][:, [1, 3]] = rated
    s["llm-attention"][:, [0, 2, 4]] = 1 - rated  # the other text tokens look elsewhere
    selection = make("sparsevlm").select(s)
    assert selection.keep.tolist() == torch.arange(5, 88, 9).tolist()


def test_sparsevlm_averages_only_the_heads_that_look_at_the_image_most():
    s = llm_signals(10, heads=3)
    s["llm-rope"][:] = 1.0  # no correction
    s["llm-text-embeds"][:] = 1.0  # every text token rates equally: all of them are raters
    s["llm-attention"][:] = 0.001
    s["llm-attention"][0, :, :10] = 1.0  # head 0 gives the image the most, on its first ten tokens
    s["llm-attention"][1, :, 50:60] = 0.5
    assert make("sparsevlm", heads=1).select(s).keep.tolist() == list(range(10))
    assert make("sparsevlm", heads=2).select(s).keep.tolist() == list(range(10))  # 1.0 beats 0.5 averaged


def test_sparsevlm_schedules_and_layers_counting_the_budget_after_the_cuts():
    after = dict(budget_after_cuts=True)
    assert cuts_of("sparsevlm", 32, 576, 118, **after) == [(2, 2, 300), (6, 6, 200), (15, 15, 118)]  # "192", v2.0
    assert cuts_of("sparsevlm", 32, 576, 60, **after) == [(2, 2, 238), (6, 6, 108), (15, 15, 60)]  # "128"
    assert cuts_of("sparsevlm", 32, 576, 20, **after) == [(2, 2, 66), (6, 6, 34), (15, 15, 20)]  # "64"
    assert cuts_of("sparsevlm", 32, 2928, 585, **after) == [(2, 2, 1487), (6, 6, 991), (15, 15, 585)]  # nearest "192"
    # layers scaled by 8/32 to the nearest: 2 -> 1 (0.5 rounds up), 6 -> 2 (1.5), 15 -> 4 (3.75)
    assert cuts_of("sparsevlm", 8, 2340, 468, **after) == [(1, 1, 1189), (2, 2, 793), (4, 4, 468)]
    assert cuts_of("sparsevlm", 4, 2340, 468, **after) == [(1, 1, 793), (2, 2, 468)]  # 2 and 6 both on layer 1
