"""MustDrop's decode stage: after the prefill, the KV caches of the layers from the first cut's scoring
layer up to the last cut are cut down to the tokens the last cut keeps. Checked on the tiny LLaVA-NeXT
and Qwen2-VL against the same prefill without compaction (the caches are that one's, gathered at the
kept tokens) and against a rerun without a cache whose mask hides, from those layers on, the dropped
tokens from the generated ones."""

import pytest
import torch
from conftest import photo
from test_families import loaded
from test_llm_methods import PROMPT, generate, hooks, inputs_of

from explorer import run

# layers as in a 32-layer LLM, scaled to the depth (l * depth // 32), scored there and cut after; the caches
# are compacted from the first scoring layer on (never layer 0's: the model reads the length from it).
# tiny-llava-next, 32 layers as LLaVA-1.6-7B: "2,6,10,14" cuts before 3, 7, 11, 15, compacting from layer 2;
# "8,16" cuts before 9 and 17, compacting from 8 (layers 8-16, uncut or cut once, are compacted, those after
# 17 held only the kept tokens already). tiny-qwen2-vl, 28 layers as Qwen2-VL-2B: "2,6,10,14" scores at
# 1, 5, 8, 12, compacting from 1; "8,16" at 7 and 14, compacting from 7.
LAYERS = {"2,6,10,14": 2, "8,16": 8}
ON_QWEN2 = {"2,6,10,14": 1, "8,16": 7}


def decode(backend, prepared, inputs, tokens: int = 3, **settings):
    """generate() under MustDrop's hooks (inside the LLM only: no key set): the output, the stage and
    the kept tokens of each cut."""
    after = {"budget_after_cuts": True}  # the count left after the last cut
    stage, pruning = hooks(backend, prepared, "mustdrop", len(prepared.geometry) // 5, **settings, **after)
    with torch.no_grad(), pruning as record:
        out = generate(backend, inputs, tokens)
    return out, stage, list(record.keeps)


def hide_a_prompt_token(inputs: dict) -> dict:
    """The inputs with prompt token 1 masked out, so that every mask is materialised and must be cut."""
    mask = inputs["attention_mask"].clone()
    mask[0, 1] = 0
    return {**inputs, "attention_mask": mask}


@pytest.fixture(scope="module")
def qwen2():
    return loaded("tiny-qwen2-vl")


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("keep_positions", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_compacted_caches_are_the_prefills_at_the_final_kept_tokens(backend, layers, keep_positions, masked):
    prepared, inputs = inputs_of(backend, photo(336, 336, seed=2))
    inputs = hide_a_prompt_token(inputs) if masked else inputs
    settings = {"layers": layers, "keep_positions": keep_positions}
    on, stage, keeps = decode(backend, prepared, inputs, **settings)
    off, stage_off, keeps_off = decode(backend, prepared, inputs, **settings, compact_cache=False)
    assert stage.compact_from == LAYERS[layers] and stage_off.compact_from is None
    assert all(torch.equal(a, b) for a, b in zip(keeps, keeps_off))  # the same prefill

    ids = inputs["input_ids"][0]
    length, n = len(ids), len(prepared.geometry)
    image = (ids == backend.image_token_id).nonzero()[:, 0]
    final = torch.ones(length, dtype=torch.bool)  # the prompt positions left after the last cut
    final[image] = False
    final[image[keeps[-1]]] = True
    rows = final.nonzero()[:, 0]
    last = stage.cuts[-1].layer
    cached = stage.tokens()["visual_cached_per_layer"]
    for layer in range(backend.depth):
        a, b = on.past_key_values.layers[layer], off.past_key_values.layers[layer]
        prompt = b.keys.shape[-2] - 2  # what the prefill left in that layer (3 tokens: 2 of them cached)
        if stage.compact_from <= layer < last:  # cut down to the final kept tokens
            held = torch.ones(length, dtype=torch.bool)
            before = [c for c in stage.cuts if c.layer <= layer]
            if before:  # the prompt positions this layer's prefill left
                held[image] = False
                held[image[keeps[len(before) - 1]]] = True
            assert prompt == int(held.sum()) > len(rows)
            at = torch.searchsorted(held.nonzero()[:, 0], rows)
            assert a.keys.shape[-2] == len(rows) + 2 == prepared.text_tokens + len(keeps[-1]) + 2
            torch.testing.assert_close(a.keys[:, :, : len(rows)], b.keys[:, :, at], rtol=0, atol=0)
            torch.testing.assert_close(a.values[:, :, : len(rows)], b.values[:, :, at], rtol=0, atol=0)
        else:  # as the prefill left it: the prompt part is the same
            assert a.keys.shape == b.keys.shape
            assert torch.equal(a.keys[:, :, :prompt], b.keys[:, :, :prompt])
            assert torch.equal(a.values[:, :, :prompt], b.values[:, :, :prompt])
            if layer < stage.compact_from:  # the whole prompt, and the first new token as without compaction
                # (the second may differ: the first decode step read the compacted layers after these)
                first = prompt + 1
                assert prompt == length and torch.equal(a.keys[:, :, :first], b.keys[:, :, :first])
                assert torch.equal(a.values[:, :, :first], b.values[:, :, :first])
        assert a.keys.shape[-2] == prepared.text_tokens + cached[layer] + 2
    assert cached == [n if layer < stage.compact_from else len(keeps[-1]) for layer in range(backend.depth)]

    assert on.sequences[0, length] == off.sequences[0, length]  # the prefill chooses the first token
    assert torch.equal(on.logits[0], off.logits[0])
    assert not torch.allclose(on.logits[1], off.logits[1])  # decoding on fewer tokens changes the logits


def reference_logits(backend, prepared, inputs, new, keeps, stage, keep_positions, positions=None):
    """The logits of each generated token from a rerun without a cache, the same tokens cut, where from
    the compacted layers on the generated tokens cannot see the visual tokens the last cut dropped:
    what the compacted caches give, computed without them. `positions`: the full prompt's (3, 1, L)
    M-RoPE positions (Qwen2-VL)."""
    ids = inputs["input_ids"]
    length = ids.shape[1]
    image = (ids[0] == backend.image_token_id).nonzero()[:, 0]
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[image] = True
    dropped[image[keeps[-1]]] = False
    logits = []
    for t in range(len(new)):
        total = length + t
        padding = torch.cat([inputs["attention_mask"][0], torch.ones(t, dtype=torch.long)]).bool()  # (total,)
        plain = torch.ones(total, total, dtype=torch.bool).tril() & padding[None, :]  # causal, padding hidden
        compacted = plain.clone()
        compacted[length:, :length] &= ~dropped[None, :]  # generated rows: the dropped tokens are gone
        order = (padding.long().cumsum(0) - 1).clamp(min=0)[None, :]  # as generate() numbers them
        if positions is not None:  # Qwen2-VL: the text order, then the M-RoPE axes, one more a token
            after = positions[..., -1:] + torch.arange(1, t + 1)
            order = torch.cat([order[None], torch.cat([positions, after], -1)])
        replay = backend.pruning(prepared, stage.pairs, (), lambda cut, maps, alive: keeps[cut], keep_positions)

        def uncompacted(module, args, kwargs, mask=plain[None, None]):  # the layers before compact_from
            return args, {**kwargs, "attention_mask": mask}

        layers = backend.language_model.layers[: stage.compact_from]
        with torch.no_grad(), replay:
            handles = [layer.register_forward_pre_hook(uncompacted, with_kwargs=True) for layer in layers]
            try:
                out = backend.model(
                    input_ids=torch.cat([ids, new[None, :t]], 1),
                    attention_mask=compacted[None, None],
                    position_ids=order,
                    mm_encoder_outputs=inputs["mm_encoder_outputs"],
                    use_cache=False,
                )
            finally:
                for handle in handles:
                    handle.remove()
        logits.append(out.logits[0, -1])
    return logits


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("keep_positions", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_decoding_on_compacted_caches_equals_a_rerun_that_hides_the_dropped_tokens(
    backend, layers, keep_positions, masked
):
    prepared, inputs = inputs_of(backend, photo(336, 336, seed=3))
    inputs = hide_a_prompt_token(inputs) if masked else inputs
    out, stage, keeps = decode(backend, prepared, inputs, 4, layers=layers, keep_positions=keep_positions)
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    expected = reference_logits(backend, prepared, inputs, new, keeps, stage, keep_positions)
    for t, logits in enumerate(expected):
        torch.testing.assert_close(logits, out.logits[t][0], rtol=1e-4, atol=1e-4)
        assert logits.argmax() == new[t]


@pytest.mark.parametrize("keep_positions", [False, True])
def test_qwen_decodes_on_compacted_caches_as_a_rerun_that_hides_the_dropped_tokens(qwen2, keep_positions):
    """Qwen2-VL: the compacted layers keep their M-RoPE numbering (renumbered on all three axes)."""
    backend = qwen2
    prepared, inputs = inputs_of(backend, photo(448, 336, seed=6))
    for layers, compact_from in ON_QWEN2.items():
        out, stage, keeps = decode(backend, prepared, inputs, 3, layers=layers, keep_positions=keep_positions)
        assert stage.compact_from == compact_from
        length = inputs["input_ids"].shape[1]
        new = out.sequences[0, length:]
        for layer, cache in enumerate(out.past_key_values.layers):
            visual = stage.tokens()["visual_cached_per_layer"][layer]
            assert cache.keys.shape[-2] == prepared.text_tokens + visual + 2
        positions = inputs["position_ids"][1:]  # (3, 1, L) the full prompt's M-RoPE positions
        expected = reference_logits(backend, prepared, inputs, new, keeps, stage, keep_positions, positions)
        for t, logits in enumerate(expected):
            torch.testing.assert_close(logits, out.logits[t][0], rtol=1e-4, atol=1e-4)
            assert logits.argmax() == new[t]
        off, _, _ = decode(
            backend, prepared, inputs, 3, layers=layers, keep_positions=keep_positions, compact_cache=False
        )
        assert torch.equal(off.logits[0], out.logits[0]) and not torch.allclose(off.logits[1], out.logits[1])


def test_keeping_every_token_with_compaction_is_the_unreduced_model(backend):
    image = photo(336, 336, seed=5)
    full = run(backend, image, PROMPT, "none", max_new_tokens=8)
    everything = run(backend, image, PROMPT, "mustdrop", 1.0, settings={"layers": "8,16"}, max_new_tokens=8)
    assert everything.settings["compact_cache"] and everything.answer_ids == full.answer_ids


def test_the_run_reports_what_the_caches_hold_while_decoding(backend):
    image = photo(640, 480, seed=5)
    settings = {"layers": "8,16", "budget_after_cuts": True}
    on = run(backend, image, PROMPT, "mustdrop", 0.2, settings=settings, max_new_tokens=3)
    off = run(backend, image, PROMPT, "mustdrop", 0.2, settings=settings | {"compact_cache": False}, max_new_tokens=3)
    entering, kept = on.tokens["visual_entering"], on.tokens["visual_kept"]
    middle = on.tokens["llm_cuts"][0]["kept"]
    # "8,16" on 32 layers: cuts before 9 and 17, the caches compacted from layer 8 on
    assert (
        on.tokens["visual_per_layer"] == off.tokens["visual_per_layer"] == [entering] * 9 + [middle] * 8 + [kept] * 15
    )
    assert on.tokens["visual_cached_per_layer"] == [entering] * 8 + [kept] * 24
    assert off.tokens["visual_cached_per_layer"] == off.tokens["visual_per_layer"]
    assert on.cost["prefill_flops"] == off.cost["prefill_flops"] and on.cost["kv_bytes"] < off.cost["kv_bytes"]
    assert on.answer_ids[0] == off.answer_ids[0]


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_fidelity_reads_the_answer_on_the_compacted_caches(name):
    """Teacher forcing scores an answer as the compacting decode would generate it: its own greedy
    choices, and the first token's distribution as without compaction (the same prefill); on Qwen2-VL
    with its M-RoPE positions for the prompt and the answer."""
    from explorer.engine.fidelity import logprobs

    backend, image, on = loaded(name), photo(400, 300, seed=6), {"budget_after_cuts": True}
    off = on | {"compact_cache": False}
    answer = run(backend, image, PROMPT, "mustdrop", 0.1, settings=on, max_new_tokens=6).answer_ids
    mine = logprobs(backend, image, PROMPT, answer, "mustdrop", 0.1, on)
    assert mine.shape[0] == 6 and mine.argmax(-1).tolist() == list(answer)
    uncompacted = logprobs(backend, image, PROMPT, answer, "mustdrop", 0.1, off)
    torch.testing.assert_close(mine[0], uncompacted[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mine[1:], uncompacted[1:])


def test_the_app_says_which_caches_hold_only_the_final_set(backend):
    from explorer.views import teach

    image = photo(640, 480, seed=5)
    cases = [({"layers": "8,16"}, True), ({"layers": "8,16", "compact_cache": False}, False)]
    for settings, said in cases:
        settings |= {"budget_after_cuts": True}
        result = run(backend, image, PROMPT, "mustdrop", 0.2, settings=settings, max_new_tokens=1)
        captions = [caption for _, caption in teach.steps(image, result)]
        final = [c for c in captions if c.startswith("What reaches the LLM's layers from layer 17 on: 468 of 2340")]
        assert final and all(
            ("while decoding, the KV caches from layer 8 on hold only these" in c) == said for c in final
        )
