"""Issue 7's measuring tools: full-size random-weight architectures, the analytic costs, the floor
(`uniform`), batched runs and the bench built on them. Timings are never asserted, only what they are
made of."""

import csv
import json

import pytest
import torch
from conftest import photo
from torch.utils.flop_counter import FlopCounterMode

import backends
from backends.signals import HIDDEN_FEATURE
from explorer.cli import main
from explorer.core import Budget, ExplorerError, Signals
from explorer.engine.cost import Shape, kv_bytes, prefill_flops
from explorer.engine.llm import llm_hooks
from explorer.engine.pipeline import run, run_batch
from explorer.evaluation import bench
from explorer.methods import make
from explorer.methods.uniform import Uniform
from explorer.views import stages

# Hub checkpoint -> (its parameter count as the Hub shows it, rounded; its family's tiny model)
PUBLISHED = {
    "llava-hf/llava-v1.6-vicuna-7b-hf": 7.06e9,
    "llava-hf/llava-v1.6-vicuna-13b-hf": 13.4e9,
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": 0.894e9,
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": 8.03e9,
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_full_size_architectures_are_the_real_ones(name):
    """Built on the meta device (no memory): the parameter count is the checkpoint's, the image
    geometry its family's, and the prompt's token ids are those of the tiny model's tokenizer."""
    built = backends.full_size(name, torch.device("meta"))
    assert built.name == name and built.random_weights and not built.model.training
    count = sum(p.numel() for p in built.model.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, count
    tiny = backends.load(backends.FULL_SIZE[name], "cpu")
    assert built.image_token_id == tiny.image_token_id and type(built) is type(tiny)
    for size in ([672, 672], [400, 1000]):  # (height, width): the same tokens as the real processor
        assert len(built.layout(size)[0]) == len(tiny.layout(size)[0])
    assert (
        len(built.layout([672, 672])[0]) == {"LLaVA-NeXT": 2928, "LLaVA-OneVision": 3699, "Qwen2-VL": 576}[built.family]
    )
    stored = json.loads((backends.CONFIGS / f"{name.replace('/', '--')}.json").read_text())["text_config"]
    assert (built.depth, Shape.of(built.model.config).hidden) == (stored["num_hidden_layers"], stored["hidden_size"])


def test_random_weights_build_and_run_the_full_size_model(capsys, tmp_path):
    """The smallest stored architecture, LLaVA-OneVision 0.5B, built for real on the CPU by the CLI
    and run: the LLM sees the kept tokens of a real-size prompt."""
    image = tmp_path / "square.png"  # small and square: the thumbnail and one crop (1485 tokens), the fewest
    photo(384, 384).save(image)  # SigLIP passes; what is asserted does not depend on the image's size
    code = main(
        ["run", "--model", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "--random-weights", "--device", "cpu"]
        + ["--image", str(image), "--prompt", "What is it?", "--method", "cls", "--budget", "0.1"]
        + ["--max-new-tokens", "2", "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["random_weights"] and out["model"] == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    assert out["tokens"]["visual_kept"] == out["tokens"]["visual_full"] // 10 and out["tokens"]["generated"] == 2
    assert out["tokens"]["visual_full"] == 1485


def test_an_architecture_without_a_stored_config_is_refused():
    with pytest.raises(ExplorerError, match="no stored architecture for 'llava-hf/llava-1.5-7b-hf'"):
        backends.load("llava-hf/llava-1.5-7b-hf", "cpu", random_weights=True)


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2-vl"])  # Qwen: grouped-query attention, biases
def test_prefill_flops_are_what_torch_counts(name, tmp_path):
    """The analytic FLOPs of a prefill of T tokens equal torch's count of the matrix products of the
    LLM and of the LM head on the last token (eager attention, so that q.k and the weighted sum of v
    are counted too)."""
    built = backends.load(name, "cpu")
    built.model.set_attn_implementation("eager")
    try:
        shape, t = Shape.of(built.model.config), 37
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            hidden = built.language_model(inputs_embeds=torch.randn(1, t, shape.hidden)).last_hidden_state
            built.model.lm_head(hidden[:, -1:])
        assert counter.get_total_flops() == prefill_flops(shape, [t] * shape.layers)
        # written out for one layer of Qwen's: q, o (h x h); k, v (h x kv*d); MLP (3 h x mlp); q.k, a.v; head
        if name == "tiny-qwen2-vl":
            h, kv, m, v = 32, 2 * 8, 64, shape.vocab
            one = 2 * t * (2 * h * h + 2 * h * kv + 3 * h * m) + 2 * 2 * t * t * h
            assert prefill_flops(shape, [t] * shape.layers) == 28 * one + 2 * h * v  # Qwen2-VL-2B's 28 layers
    finally:
        built.model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("method", ["none", "hired", "fastv", "mustdrop"])
def test_kv_bytes_are_those_of_the_cache_the_prefill_fills(backend, method):
    """The cache a real decode works on, the llm-stage method's pruned one included (MustDrop's cut
    down to its final kept set after the prefill), holds in its prompt part exactly the bytes computed
    from the result's per-layer token counts."""
    image, prompt = photo(500, 300), "What is it?"
    after = {"budget_after_cuts": True} if make(method).stage == "llm" else {}  # 25% left after the last cut
    result = run(backend, image, prompt, method, 0.25, settings=after, max_new_tokens=1)
    chosen, budget = make(method, **after), result.tokens["visual_budget"]
    with torch.inference_mode():
        prepared = backend.prepare(image, prompt)
        features, signals = backend.encode(prepared, chosen.vision_needs)
        before = None
        if chosen.select_vision is not None:  # MustDrop's step before the LLM: only its tokens enter
            before = chosen.select_vision(Signals(prepared.geometry, budget, signals))
        keep = result.selection.keep if chosen.stage == "vision" else torch.arange(len(prepared.geometry))
        keep = keep if before is None else before.keep
        _, hooks = llm_hooks(backend, prepared, method, chosen, budget or len(keep), before)
        inputs = backend.generate_inputs(prepared, features, keep)
        with hooks:
            out = backend.model.generate(
                **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
            )
    held = sum(layer.keys[:, :, :-2].nbytes + layer.values[:, :, :-2].nbytes for layer in out.past_key_values.layers)
    cached = [result.tokens["text"] + v for v in result.tokens["visual_cached_per_layer"]]
    assert held == kv_bytes(Shape.of(backend.model.config), cached, 4) == result.cost["kv_bytes"]
    per_layer = [result.tokens["text"] + v for v in result.tokens["visual_per_layer"]]
    assert result.cost["prefill_flops"] == prefill_flops(Shape.of(backend.model.config), per_layer)
    full, kept = result.tokens["visual_full"], result.tokens["visual_kept"]
    if method == "fastv":  # layers 0-1 of 32 hold every visual token, layers 2-31 the kept quarter
        assert result.tokens["visual_per_layer"] == result.tokens["visual_cached_per_layer"] == [full] * 2 + [kept] * 30
    if method == "mustdrop":  # scored at 2, 6, 10, 14, cut after each; compacted from 2: 0-1 keep all that entered
        entering, cuts = result.tokens["visual_entering"], result.tokens["llm_cuts"]
        assert [cut["layer"] for cut in cuts] == [3, 7, 11, 15]
        first, second, third = (cut["kept"] for cut in cuts[:3])
        every = [entering] * 3 + [first] * 4 + [second] * 4 + [third] * 4 + [kept] * 17
        assert result.tokens["visual_per_layer"] == every
        assert result.tokens["visual_cached_per_layer"] == [entering] * 2 + [kept] * 30
    if method in ("none", "hired"):
        assert result.tokens["visual_cached_per_layer"] == result.tokens["visual_per_layer"] == [kept] * 32


def test_uniform_keeps_evenly_spaced_tokens_without_signals(backend, monkeypatch):
    """The floor does no selection work: its vision pass captures no signal, and from the end of that
    pass to the end of its selection nothing runs on the model (how long that takes is the bench's
    `select ms`, never asserted here)."""
    method = make("uniform")
    assert method.needs == () and method.stage == "vision"
    events = []  # in order: the vision pass (and what it was asked for), every module's forward, the selection
    encode, select = backend.encode, Uniform.select

    def encoding(prepared, needs, *args, **kwargs):
        events.append(("encode", tuple(needs)))
        try:
            return encode(prepared, needs, *args, **kwargs)
        finally:
            events.append(("encoded",))

    def selecting(self, signals):
        events.append(("select",))
        try:
            return select(self, signals)
        finally:
            events.append(("selected",))

    monkeypatch.setattr(backend, "encode", encoding)
    monkeypatch.setattr(Uniform, "select", selecting)
    hooks = [
        module.register_forward_pre_hook(lambda module, args: events.append(("forward", type(module).__name__)))
        for module in backend.model.modules()
    ]
    try:
        result = run(backend, photo(400, 400), "What?", "uniform", Budget(tokens=100), max_new_tokens=1)
    finally:
        for hook in hooks:
            hook.remove()
        monkeypatch.undo()
    keep, n = result.selection.keep, result.tokens["visual_full"]
    assert len(keep) == 100 and keep[0] == 0 and (keep.diff() >= n // 100).all() and (keep.diff() <= -(-n // 100)).all()
    assert result.selection.scores is None
    kinds = [event[0] for event in events]
    assert kinds.count("encode") == 1 and kinds.count("select") == 1 and "forward" in kinds  # the hooks see forwards
    (needs,) = [event[1] for event in events if event[0] == "encode"]
    assert set(needs) <= {HIDDEN_FEATURE}  # no signal: at most the encoder's output, which the LLM gets anyway
    assert events[kinds.index("encoded") + 1 : kinds.index("selected")] == [("select",)], events  # no work between
    assert run(backend, photo(400, 400), "What?", "uniform", 1.0, max_new_tokens=1).tokens["visual_kept"] == n


@pytest.mark.parametrize("name", [n for n in backends.RANDOM if n.startswith("tiny-")])
def test_a_batch_answers_each_image_as_a_single_run_would(name):
    """Two images of different shapes, each with its own budget, in one generate() call, left-padded
    (Qwen's M-RoPE positions too): each answer and token count equals that image's own run."""
    built = backends.load(name, "cpu")
    images, budgets = [photo(500, 300, seed=1), photo(200, 420, seed=2)], [Budget(fraction=0.2), Budget(tokens=50)]
    batch = run_batch(built, images, "What is it?", "cls", budgets, max_new_tokens=4, min_new_tokens=4)
    for image, budget, answer, tokens in zip(images, budgets, batch.answers, batch.tokens):
        alone = run(built, image, "What is it?", "cls", budget, max_new_tokens=4, min_new_tokens=4)
        assert answer == alone.answer
        assert tokens["visual_kept"] == alone.tokens["visual_kept"] == budget.resolve(tokens["visual_full"])
    timing = batch.timing
    assert (
        0 < timing["prefill_s"] < timing["ttft_s"] <= timing["total_s"]
        and timing["images_per_s"] == 2 / timing["total_s"]
    )


def test_batches_refuse_what_runs_one_image_at_a_time(backend):
    image = photo(300, 300)
    with pytest.raises(ExplorerError, match="fastv prunes inside the LLM"):
        run_batch(backend, [image, image], "What?", "fastv", 0.2)
    with pytest.raises(ExplorerError, match="one budget per image: got 2 images and 3 budgets"):
        run_batch(backend, [image, image], "What?", "cls", [0.2, 0.2, 0.2])
    assert run_batch(backend, [image], "What?", "cls", 0.2, max_new_tokens=1).tokens[0]["visual_kept"] > 0  # serves on


def test_the_floor_is_uniform_with_each_cell_s_token_count(backend):
    done = {}
    rows = bench.sweep(
        backend,
        photo(500, 300),
        "What?",
        ["hired"],
        [Budget(fraction=0.2), Budget(fraction=1.0)],
        2,
        1,
        0,
        done,
        floor=True,
    )
    none, hired, whole = rows
    floor = done["uniform", str(Budget(tokens=hired["visual_kept"])), 1]
    assert floor["visual_kept"] == hired["visual_kept"] and hired["floor_ttft_s"] == floor["ttft_s"]
    assert hired["over_floor"] == hired["ttft_s"] / floor["ttft_s"]
    assert none["floor_ttft_s"] == none["ttft_s"]  # every token kept: the unreduced run is the floor
    assert whole["visual_kept"] < whole["visual_full"]  # HiRED drops the newlines even at budget 1
    assert whole["floor_ttft_s"] == done["uniform", f"{whole['visual_kept']} tokens", 1]["ttft_s"]
    shape, text = Shape.of(backend.model.config), backend.prepare(photo(500, 300), "What?").text_tokens
    assert hired["prefill_tflops"] * 1e12 == prefill_flops(shape, [text + hired["visual_kept"]] * shape.layers)


def test_a_cell_that_runs_out_of_memory_says_so_and_the_others_are_measured(backend):
    """The unreduced batch "does not fit" (a forward hook raises the device's out-of-memory error for
    it); its row says so, the 20% batch is measured, and the table and the charts are still made."""

    def too_big(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] == 2 and ids.shape[1] > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = backend.model.register_forward_pre_hook(too_big, with_kwargs=True)
    try:
        rows = bench.sweep(
            backend, photo(500, 300), "What?", ["cls"], [Budget(fraction=0.2)], 2, 1, 0, batch=2, floor=True
        )
    finally:
        handle.remove()
    failed, cls = rows
    assert failed["answer"].startswith("out of memory on cpu") and failed["ttft_s"] is None
    assert cls["ttft_s"] > 0 and cls["ttft_ratio"] is None and cls["batch"] == 2 and cls["images_per_s"] > 0
    text = backend.prepare(photo(500, 300), "What?").text_tokens
    assert cls["kv_bytes"] == 2 * kv_bytes(Shape.of(backend.model.config), [text + cls["visual_kept"]] * 32, 4)
    printed = bench.table(rows).splitlines()  # the reason under the table, the column as wide as its numbers
    assert "see (1)" in printed[1] and "out of memory" not in printed[1]
    assert printed[-1].startswith("(1) none -: out of memory on cpu")
    chart = bench.charts({"batch 2": rows})  # TTFT (cls and its floor), memory, vision and LLM FLOPs (cls)
    names = ["cls", "floor (k tokens, no selection)", "cls", "cls", "cls", *stages.STAGES]  # then where the time went
    assert [t.name for t in chart.data] == names and [list(t.x) for t in chart.data[5:]] == [["cls 0.2"]] * 5
    assert sum(t.y[0] for t in chart.data[5:]) == pytest.approx(cls["total_s"], rel=0.05)  # medians, so near it
    assert chart.layout.xaxis.title.text == f"visual tokens per LLM layer, mean (of {cls['visual_full']})"


def test_bench_sweeps_sizes_and_batches_into_csv_html_and_png(capsys, tmp_path):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            "tiny-llava-next",
            "--image",
            "assets/coffee.jpg",
            "--methods",
            "hired",
            "--budgets",
            "0.2",
        ]
        + ["--sizes", "336x336,672x672", "--batch", "1,2", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2"]
        + ["--csv", f"{out}.csv", "--plot", f"{out}.html"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert [(r["size"], r["batch"], r["method"]) for r in rows] == [
        (size, batch, method)
        for size in ("336x336", "672x672")
        for batch in ("1", "2")
        for method in ("none", "hired", "uniform")  # the floor's own row last
    ]
    hired, floor = rows[1], rows[2]
    assert floor["budget"] == f"{hired['visual_kept']} tokens" and floor["ttft_s"] == hired["floor_ttft_s"]
    assert {r["visual_full"] for r in rows if r["size"] == "672x672"} == {"2928"}
    assert all(
        r["model"] == "tiny-llava-next" and float(r["floor_ttft_s"]) > 0 and float(r["kv_bytes"]) > 0 for r in rows
    )
    batched = [r for r in rows if r["batch"] == "2"]
    assert all(r["kl"] == "" for r in batched) and all(float(r["images_per_s"]) > 0 for r in batched)
    assert "tiny-llava-next 672x672 batch 2" in printed and f"wrote {out}.html and {out}.png" in printed
    assert open(f"{out}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "tiny-llava-next 336x336 batch 2: time to first token" in open(f"{out}.html").read()


NEXT, ONE_VIEW, OV = "tiny-llava-next", "tiny-llava-1.5", "tiny-llava-onevision"  # LLaVA-1.5 has no thumbnail


@pytest.mark.parametrize(
    "name, method",
    [(NEXT, "cls"), (NEXT, "hired"), (NEXT, "visionzip"), (ONE_VIEW, "cls"), (ONE_VIEW, "visionzip")]
    + [(OV, "hired"), (OV, "visionzip")],
)
def test_only_the_kept_tokens_reach_the_projector(name, method):
    """Families whose tokens are single patches run the encoder alone and project only what is kept
    (VisionZip: its merged tokens too); the LLM gets the same inputs as from the full projection.
    The unreduced run still projects everything, through the model's own code."""
    built = backends.load(name, "cpu")
    projector = built.model.model.multi_modal_projector
    seen = []
    handle = projector.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        image, prompt = photo(500, 300), "What is it?"
        result = run(built, image, prompt, method, 0.1, max_new_tokens=1)
        keep, g = result.selection.keep, result.geometry
        newline = g.names.index("newline") if "newline" in g.names else -1
        assert seen == [int((g.partition[keep] != newline).sum())]  # the kept tokens, newlines are no patches
        seen.clear()
        run(built, image, prompt, "none", 1.0, max_new_tokens=1)
        side = built.model.config.vision_config.image_size // built.model.config.vision_config.patch_size
        assert seen == [(len(g.names) - (newline >= 0)) * side**2]  # every patch of every crop, padding too
    finally:
        handle.remove()
    chosen = make(method)
    with torch.inference_mode():
        prepared = built.prepare(image, prompt)
        needs = tuple(dict.fromkeys((*chosen.needs, "hidden@feature")))
        stock, signals = built.encode(prepared, needs)
        selection = chosen.select(Signals(g, len(keep), signals))
        if selection.weights is not None:
            stock = built.merge(stock, signals, selection)
        _, alone = built.encode(prepared, needs, project=False)
        lazy = built.kept_features(alone, selection)
    assert torch.equal(selection.keep, keep)
    torch.testing.assert_close(lazy[keep], stock[keep], atol=1e-5, rtol=1e-5)


def test_cells_take_turns_and_the_floor_joins_in_the_first_round(backend, monkeypatch):
    """Each round runs every cell once (the floor as soon as a cell's kept count is known), so a slow
    spell of the machine falls on all of them; the first `warmup` rounds are not measured."""
    calls = []

    def spy(backend, image, prompt, method, budget, **options):
        calls.append((method, str(budget)))
        return run(backend, image, prompt, method, budget, **options)

    monkeypatch.setattr(bench, "run", spy)
    rows = bench.sweep(
        backend, photo(500, 300), "What?", ["cls", "random"], [Budget(fraction=0.2)], 2, 2, 1, floor=True
    )
    turn = [("none", "1"), ("cls", "0.2"), ("random", "0.2"), ("uniform", f"{rows[1]['visual_kept']} tokens")]
    assert calls == turn * 3
    assert rows[1]["ttft_min_s"] <= rows[1]["ttft_s"] <= rows[1]["ttft_max_s"]


def test_cells_added_to_a_cached_sweep_drift_on_the_unreduced_answer(backend):
    """The app reuses cells: a method swept later is still measured against the unreduced run's answer."""
    image, budgets = photo(500, 300), [Budget(fraction=0.1)]
    done = {}
    bench.sweep(backend, image, "What?", ["cls"], budgets, 4, 1, 0, done)
    later = bench.sweep(backend, image, "What?", ["cls", "random"], budgets, 4, 1, 0, done)
    fresh = bench.sweep(backend, image, "What?", ["random"], budgets, 4, 1, 0)
    assert later[2]["method"] == fresh[1]["method"] == "random"
    assert (later[2]["kl"], later[2]["logprob_diff"]) == (fresh[1]["kl"], fresh[1]["logprob_diff"]) and fresh[1][
        "kl"
    ] > 0
