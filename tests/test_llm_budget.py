"""The budget of a method that prunes inside the LLM: by default the mean visual tokens over the LLM's
layers, as the papers compare these methods (`budget_after_cuts`: what the last cut leaves). Every such
method meets it as closely as whole counts allow from below, says clearly when it cannot, and the
numbers each method's docstring quotes are what its code gives. SparseVLM keeps the official v2.0
stage counts on a 32-layer LLM, layer by layer as the official code counts them."""

import inspect

import pytest
from conftest import photo
from test_families import loaded

from explorer import METHODS, Budget, ExplorerError, make, run
from explorer.engine.llm import layer_mean, least_mean, plan
from explorer.engine.pipeline import step_budget
from explorer.evaluation import bench

PROMPT = "What is shown in this image?"
LLM = [name for name, method in METHODS.items() if method.stage == "llm" and "clip" not in method.requires]  # on images


@pytest.mark.parametrize("name", LLM)
def test_every_llm_method_meets_its_budget_as_a_layer_mean(backend, name):
    result = run(backend, photo(640, 480, seed=1), PROMPT, name, 0.7, max_new_tokens=1)
    t = result.tokens
    b, depth = 1638, backend.depth  # 70% of 2340, on tiny-llava-next's 32 layers (LLaVA-1.6-7B's)
    assert t["visual_budget"] == b and t["visual_kept"] == len(result.selection.keep) < b
    assert t["visual_layer_mean"] == sum(t["visual_per_layer"]) / depth <= b
    method, entering, kept = make(name), t["visual_entering"], t["visual_kept"]
    cuts = plan(method, depth, entering, b)
    assert [(c.layer, c.tokens) for c in cuts] == [(c["layer"], c["kept"]) for c in t["llm_cuts"]]
    if method.mean_cuts is None:  # the largest count after the cuts that keeps the mean at most B
        assert layer_mean(method.cuts(depth, entering, kept + 1), entering, depth) > b
    json = result.to_json()["tokens"]
    assert (json["visual_kept"], json["visual_layer_mean"]) == (kept, t["visual_layer_mean"])  # --json: both


def test_a_budget_the_layers_cannot_meet_is_refused_and_the_next_run_works(backend):
    image = photo(640, 480, seed=1)
    # 5% of 2340 is 117; FastV's layers 0-1 see all 2340, so 1 token kept from layer 2 of 32 averages
    # (2 * 2340 + 30 * 1) / 32 = 4710 / 32 = 147.1875
    message = (
        "fastv: a budget of 117 visual tokens per LLM layer on average is less than its cuts can reach with "
        "the 2340 visual tokens that enter the LLM: the layers before its first cut see them all, so even keeping "
        "1 token after its cuts averages 147.2 over the 32 layers"
    )
    with pytest.raises(ExplorerError, match=message):
        run(backend, image, PROMPT, "fastv", 0.05, max_new_tokens=1)
    with pytest.raises(ExplorerError, match="sparsevlm: a budget of 117 visual tokens per LLM layer on average"):
        run(backend, image, PROMPT, "sparsevlm", 0.05, max_new_tokens=1)
    after = run(backend, image, PROMPT, "fastv", 0.05, settings={"budget_after_cuts": True}, max_new_tokens=1)
    assert after.tokens["visual_kept"] == 117 and after.tokens["visual_layer_mean"] == (2 * 2340 + 30 * 117) / 32
    assert least_mean(make("fastv"), 32, 2340) == 147.1875
    assert least_mean(make("fastv"), 4, 2340) == (2 * 2340 + 2 * 1) / 4 == 1170.5  # a 4-layer LLM reaches far less


def test_the_bench_compares_at_equal_mean_and_goes_on_past_a_budget_out_of_reach(backend):
    done = {}
    budgets = [Budget(fraction=0.6), Budget(fraction=0.05)]
    rows = bench.sweep(backend, photo(640, 480), "What?", ["fastv"], budgets, 1, 1, 0, done, floor=True)
    fastv, missed = rows[1], rows[2]
    # B = 60% of 2340 = 1404 on 32 layers: the largest R with (2 * 2340 + 30 R) / 32 <= 1404 is
    # floor((32 * 1404 - 4680) / 30) = floor(1341.6) = 1341, a mean of (4680 + 30 * 1341) / 32 = 1403.4375
    assert (fastv["visual_kept"], fastv["visual_layer_mean"]) == (1341, 1403.4375)
    floor = done["uniform", "1403 tokens", 1]  # as many tokens per layer as fastv's mean, rounded, no selection
    assert fastv["floor_ttft_s"] == floor["ttft_s"] and fastv["over_floor"] == fastv["ttft_s"] / floor["ttft_s"]
    assert missed["ttft_s"] is None and "less than its cuts can reach" in missed["answer"]  # 117 < 147.1875
    assert [trace.x for trace in bench.traces(rows, "ttft_s")][0] == (1403.4375,)  # drawn at its layer mean


# --- SparseVLM's official schedules ----------------------------------------------------------------


def official_mean(counts) -> float:
    """SparseVLM's "Equal Tokens" on 32 layers (modelling_sparse_llama.py L359, L368): layers 0-1 the 576,
    2-5 the first stage's count, 6-14 the second's, 15-31 the third's."""
    c1, c2, c3 = counts
    return (2 * 576 + 4 * c1 + 9 * c2 + 17 * c3) / 32


def test_sparsevlm_keeps_the_official_stage_counts_on_32_layers_and_else_the_mean_exactly():
    method = make("sparsevlm")
    official = {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}  # score.py L11-14
    for budget, counts in official.items():
        cuts = method.mean_cuts(32, 576, budget)
        assert [(c.layer, c.score_layer, c.tokens) for c in cuts] == list(zip((2, 6, 15), (2, 6, 15), counts))
        assert layer_mean(cuts, 576, 32) == official_mean(counts)  # counted as the official code counts
    for budget in set(range(40, 570, 3)) - set(official):  # elsewhere the mean is B exactly
        cuts = method.mean_cuts(32, 576, budget)
        assert layer_mean(cuts, 576, 32) == budget, budget
        assert [c.tokens for c in cuts] == sorted((c.tokens for c in cuts), reverse=True)
    assert [c.tokens for c in method.mean_cuts(32, 2340, 780)] == [1218, 812, 479]  # "192" on 2340: c * 2340 // 576
    assert layer_mean(method.mean_cuts(28, 2340, 702), 2340, 28) == 702  # other depths: the mean is B


@pytest.fixture(scope="module")
def deep_llava():
    """The tiny LLaVA-1.5 (576 visual tokens), with LLaVA-1.5-7B's 32 LLM layers."""
    backend = loaded("tiny-llava-1.5")
    assert backend.depth == 32
    return backend


@pytest.mark.parametrize("paper", [192, 64])
def test_sparsevlm_on_a_32_layer_llava_1_5_runs_each_layer_with_the_count_the_code_counts_it_with(deep_llava, paper):
    seen = {}  # what each layer's MLP was given in the prefill
    layers = deep_llava.language_model.layers
    observers = [
        block.mlp.register_forward_hook(lambda module, args, out, i=i: seen.setdefault(i, out.shape[1]))
        for i, block in enumerate(layers)
    ]
    try:
        result = run(deep_llava, photo(500, 400), PROMPT, "sparsevlm", Budget(tokens=paper), max_new_tokens=1)
    finally:
        for observer in observers:
            observer.remove()
    c1, c2, c3 = {192: (300, 200, 118), 64: (66, 34, 20)}[paper]
    visual = [576] * 2 + [c1] * 4 + [c2] * 9 + [c3] * 17  # as the official code counts each layer
    assert result.tokens["visual_per_layer"] == visual
    assert [seen[i] - result.tokens["text"] for i in range(32)] == visual  # and as each layer runs here
    assert result.tokens["visual_layer_mean"] == official_mean((c1, c2, c3))


# --- each method's documented example -----------------------------------------------------------


def cuts_of(name: str, depth: int, n: int, budget: int, **settings) -> list[tuple[int, int]]:
    return [(c.layer, c.tokens) for c in plan(make(name, **settings), depth, n, budget, name)]


def documented(name: str, *phrases: str) -> None:
    """Each phrase is in the method's docstring, whitespace aside."""
    doc = " ".join(inspect.getdoc(inspect.getmodule(METHODS[name])).split())
    for phrase in phrases:
        assert phrase in doc, f"{name}: {phrase!r}"


def test_fastvs_documented_example():
    documented("fastv", "B = 192 of 576 keeps R = 166 tokens from layer 2 on, a mean of 191.6")
    documented("fastv", "K = 2 keeping 144 counts as (2 * 576 + 30 * 144) / 32 = 171 tokens")
    assert layer_mean(make("fastv").cuts(32, 576, 144), 576, 32) == 171
    assert cuts_of("fastv", 32, 576, 192) == [(2, 166)]
    assert round(layer_mean(plan(make("fastv"), 32, 576, 192), 576, 32), 1) == 191.6


def test_pdrops_documented_examples():
    documented(
        "pdrop",
        "B = 270 of 576 on 32 layers gives the official 288/144/72 (mean 270); B = 192 gives 108/54/27 (mean 191.25)",
    )
    documented(
        "pdrop", "B must be above that (144 of 576 with S = 3)", "the official counts exactly when b = int(N lambda^S)"
    )
    assert cuts_of("pdrop", 32, 576, 270) == [(8, 288), (16, 144), (24, 72)]
    assert cuts_of("pdrop", 32, 576, 192) == [(8, 108), (16, 54), (24, 27)]
    assert layer_mean(plan(make("pdrop"), 32, 576, 192), 576, 32) == 191.25
    assert 144 < least_mean(make("pdrop"), 32, 576) < 146 and cuts_of("pdrop", 32, 576, 146)
    assert cuts_of("pdrop", 32, 2340, 292, budget_after_cuts=True) == [(8, 1170), (16, 585), (24, 292)]  # int(2340/2^s)


def test_darts_documented_example():
    documented("dart", 'keeps P_image + P floor(R / P): 132 for its "128" (P = 8); here R = 132 keeps the same 132, 16')
    assert cuts_of("dart", 32, 576, 132, budget_after_cuts=True) == [(2, 132)]
    assert 4 + 8 * (128 // 8) == 132 and (132 - 4) // 8 == 16  # the official count; ours: (R - P_image) / P each
    assert cuts_of("dart", 32, 576, 192) == [(2, 166)]  # as FastV: a layer mean of 191.6


def test_sparsevlms_documented_examples():
    documented(
        "sparsevlm",
        "192 of 576 keeps 300/200/118 (that count: 192.4), 128 keeps 238/108/60, 96 keeps 246/54/28 and 64 keeps 66/34/20",
        "B = 160 of 576 keeps 265/155/89, a mean of exactly 160",
        "B = 160 keeps 406/271/160 then",
        "(118, 60, 28 and 20 of 576 give the official schedules)",
    )
    assert cuts_of("sparsevlm", 32, 576, 160) == [(2, 265), (6, 155), (15, 89)]
    assert layer_mean(plan(make("sparsevlm"), 32, 576, 160), 576, 32) == 160
    assert round(official_mean((300, 200, 118)), 1) == 192.4
    after = dict(budget_after_cuts=True)
    assert cuts_of("sparsevlm", 32, 576, 160, **after) == [(2, 406), (6, 271), (15, 160)]
    for last, counts in {118: (300, 200, 118), 60: (238, 108, 60), 28: (246, 54, 28), 20: (66, 34, 20)}.items():
        assert [k for _, k in cuts_of("sparsevlm", 32, 576, last, **after)] == list(counts)
    documented("sparsevlm", "layer l becoming the nearest whole layer to l depth / 32 (at least 1)")
    assert [layer for layer, _ in cuts_of("sparsevlm", 28, 576, 300)] == [2, 5, 13]  # 1.75, 5.25, 13.1
    assert [layer for layer, _ in cuts_of("sparsevlm", 8, 576, 400)] == [1, 2, 4]  # 0.5, 1.5, 3.75


def test_mustdrops_documented_example():
    documented(
        "mustdrop",
        "with 576 tokens entering a 32-layer LLM, B = 192 keeps 360/225/140/88 after layers 2, 6, 10 and 14 (a mean of 191.4)",
    )
    assert cuts_of("mustdrop", 32, 576, 192) == [(3, 360), (7, 225), (11, 140), (15, 88)]
    assert round(layer_mean(plan(make("mustdrop"), 32, 576, 192), 576, 32), 1) == 191.4


def test_aims_documented_example():
    documented(
        "aim",
        "B = 192 of 576 on a 28-layer LLM merges to M = 238 and prunes to 221, 204, ..., 102 before layers 15 to 22 (a mean of 191.9)",
    )
    aim = make("aim")
    step = step_budget(aim, 28, 576, 192)  # the count its merge step works to
    assert aim.entering(576, step) == 238
    cuts = plan(aim, 28, 238, 192)
    assert [c.layer for c in cuts] == list(range(15, 23)) and [c.tokens for c in cuts][:2] == [221, 204]
    assert cuts[-1].tokens == 102 and round(layer_mean(cuts, 238, 28), 1) == 191.9


def test_transprune_llms_documented_example():
    documented(
        "transprune-llm",
        "B = 192 of 576 keeps 301/215/43, a mean of 191.8, and B = 237 the official 504/360/72 (a mean of 236.25)",
    )
    assert cuts_of("transprune-llm", 32, 576, 192) == [(7, 301), (9, 215), (12, 43)]
    assert round(layer_mean(plan(make("transprune-llm"), 32, 576, 192), 576, 32), 1) == 191.8
    assert cuts_of("transprune-llm", 32, 576, 237) == [(7, 504), (9, 360), (12, 72)]
    assert layer_mean(plan(make("transprune-llm"), 32, 576, 237), 576, 32) == 236.25


def test_gemfilters_documented_example():
    documented("gemfilter", "(the default here: 13 on 32 layers, 10 on 24, 11 on 28)", "which `layer` = 15 gives")
    gem = make("gemfilter")
    assert [gem.early_layer(depth) for depth in (32, 24, 28)] == [13, 10, 11]
    assert make("gemfilter", layer=15).early_layer(40) == 19  # Mistral-Nemo's 19 of 40
