"""The computed cost of two passes that used to be counted as if they had not run as they did (issue 26):
tome-vit's encoder, where later blocks run on fewer tokens after each merge (and the merges' matching runs
too), and GemFilter's first pass through the LLM's first layers on the whole prompt. Each against
torch.utils.flop_counter on a tiny model, with eager attention (so that torch counts q.k and the weighted sum
of v); on a real checkpoint's architecture the same merges spread over its own blocks. The LLM's depth is
read from the config, never assumed."""

import pytest
from conftest import photo
from torch.utils.flop_counter import FlopCounterMode

import backends
from explorer import make
from explorer.engine.cost import FirstPass, Shape, first_pass_flops, prefill_flops
from explorer.engine.pipeline import run, run_batch

PROMPT = "What is in this picture?"


def counted(function, counts: list[int]):
    """`function`, each call's FLOPs appended to `counts` as torch counts them."""

    def wrapped(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = function(*args, **kwargs)
        counts.append(counter.get_total_flops())
        return out

    return wrapped


def eager(name: str):
    built = backends.load(name, "cpu")
    built.model.set_attn_implementation("eager")
    return built


def vision_run(built, method: str, budget: float, monkeypatch):
    """A one-token run, and torch's count of its vision stage (the encoder, merging or not, and the projector)."""
    counts: list[int] = []
    with monkeypatch.context() as patch:
        for name in ("encode", "kept_features", "merge"):
            patch.setattr(built, name, counted(getattr(built, name), counts))
        result = run(built, photo(400, 300), PROMPT, method, budget, max_new_tokens=1)
    return result, sum(counts)


@pytest.mark.parametrize("name, budget", [("tiny-llava-next", 0.2), ("tiny-llava-onevision", 0.05)])
def test_tome_vit_s_encoder_is_counted_on_the_tokens_each_block_still_has(name, budget, monkeypatch):
    built = eager(name)  # CLIP with [CLS] and padded crops; SigLIP without
    result, torch_count = vision_run(built, "tome-vit", budget, monkeypatch)
    computed = result.cost["vision_flops"]
    assert abs(computed - torch_count) <= 0.05 * torch_count, (computed, torch_count)
    unmerged, _ = vision_run(built, "uniform", budget, monkeypatch)  # the whole encoder, on every token
    saved = unmerged.cost["vision_flops_parts"]["encoder"] - result.cost["vision_flops_parts"]["encoder"]
    assert saved > 0.1 * unmerged.cost["vision_flops_parts"]["encoder"]  # later blocks run on far fewer tokens
    # the real checkpoint's encoder (24 or more blocks, the tiny one's a few) spreads the same merges over its
    # own blocks, as tome-vit would there: about two thirds of its unmerged cost, neither all of it nor a fifth
    projected = result.cost["projected"]
    assert 0.5 < projected["reduced"]["vision_flops"] / projected["full"]["vision_flops"] < 0.8


@pytest.fixture(scope="module")
def llava_next():
    return eager("tiny-llava-next")


def test_gemfilter_s_first_pass_is_counted_in_the_prefill_as_torch_counts_it(llava_next, monkeypatch):
    counts: list[int] = []
    with monkeypatch.context() as patch:
        patch.setattr(llava_next, "early_pass", counted(llava_next.early_pass, counts))
        result = run(llava_next, photo(400, 300), PROMPT, "gemfilter", 0.2, max_new_tokens=1)
    (torch_count,) = counts
    cost, tokens = result.cost, result.tokens
    assert abs(cost["first_pass_flops"] - torch_count) <= 0.05 * torch_count, (cost["first_pass_flops"], torch_count)
    shape = Shape.of(llava_next.model.config)
    second = prefill_flops(shape, [tokens["text"] + tokens["visual_kept"]] * shape.layers)
    assert cost["prefill_flops"] == second + cost["first_pass_flops"]
    layer = make("gemfilter").early_layer(shape.layers)
    assert 0 < layer < shape.layers  # stopped before the last layer: less than a whole prefill on the prompt
    whole = tokens["text"] + tokens["visual_full"]
    assert cost["first_pass_flops"] < prefill_flops(shape, [whole] * shape.layers)
    real = backends.stored_config(cost["projected"]["model"])  # the real depth gets its own filter layer
    real_shape = Shape.of(real)
    first = first_pass_flops(real_shape, FirstPass(whole, make("gemfilter").early_layer(real_shape.layers)))
    kept = prefill_flops(real_shape, [tokens["text"] + tokens["visual_kept"]] * real_shape.layers)
    assert cost["projected"]["reduced"]["prefill_flops"] == kept + first


def test_a_batch_counts_every_image_s_first_pass_and_a_method_without_one_none(llava_next):
    images = [photo(400, 300), photo(300, 400, seed=1)]
    batch = run_batch(llava_next, images, PROMPT, "gemfilter", 0.2, max_new_tokens=1)
    shape, layer = Shape.of(llava_next.model.config), make("gemfilter").early_layer(llava_next.depth)
    each = [first_pass_flops(shape, FirstPass(t["text"] + t["visual_full"], layer)) for t in batch.tokens]
    plain = run_batch(llava_next, images, PROMPT, "uniform", 0.2, max_new_tokens=1).cost
    assert batch.cost["first_pass_flops"] == sum(each) and "first_pass_flops" not in plain
    assert batch.cost["prefill_flops"] == plain["prefill_flops"] + sum(each)  # the same padded second pass


def test_the_first_pass_counts_whole_layers_below_the_filter_layer_and_a_sliver_of_it():
    shape = Shape(hidden=8, layers=4, heads=2, kv_heads=1, head_dim=4, mlp=16, vocab=100)
    one_layer = (prefill_flops(shape, [10] * 4) - 2 * 8 * 100) // 4  # a layer on 10 tokens: the LM head out
    keys, query, scores = 10 * 8 * 1 * 4, 8 * 2 * 4, 2 * 10 * 4  # every key, the last query, its q.k per head
    assert first_pass_flops(shape, FirstPass(10, 2)) == 2 * one_layer + 2 * (keys + query + scores)
    assert first_pass_flops(shape, FirstPass(10, 0)) == 2 * (keys + query + scores)
