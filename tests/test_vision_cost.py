"""Issue 28's computed cost: the vision stage's FLOPs (encoder, recomputed attention maps, projector) against
torch's own count on every family's tiny model, and the cost of the real checkpoint's architecture beside a
random-weight model's (`cost.projected`). Computed, never timed."""

import json

import pytest
import torch
from conftest import photo
from test_bench import PUBLISHED as FULL_SIZE
from torch.utils.flop_counter import FlopCounterMode

import backends
from explorer.cli import main
from explorer.core import Budget, ExplorerError
from explorer.engine.cost import Encoder, Shape, VisionPass, kv_bytes, parameters, prefill_flops, vision_flops
from explorer.engine.pipeline import run
from explorer.evaluation import bench
from explorer.views import report
from explorer.views import visual as vis

PROMPT = "What is in this picture?"
REAL = {  # tiny model -> the published checkpoint its cost is projected on by default
    "tiny-llava-next": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "tiny-llava-onevision": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "tiny-qwen2-vl": "Qwen/Qwen2-VL-2B-Instruct",
    "tiny-qwen2.5-vl": "Qwen/Qwen2.5-VL-3B-Instruct",
    "tiny-smolvlm": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "tiny-idefics3": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "tiny-llava-1.5": "llava-hf/llava-1.5-7b-hf",
    "tiny-gemma3": "google/gemma-3-4b-it",
}
PUBLISHED = {  # parameters as the Hub shows them, rounded: test_bench's full-size ones and these
    **FULL_SIZE,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
    "HuggingFaceTB/SmolVLM-256M-Instruct": 0.256e9,
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": 0.256e9,
    "llava-hf/llava-1.5-7b-hf": 7.06e9,
}


def counted_run(backend, image, method: str, monkeypatch):
    """A one-token run, and torch's count of the FLOPs of its vision stage: the encoder with the method's
    hooks, and the projector wherever it runs (with the encoder, on the kept tokens, on merged ones)."""
    counts = []

    def counting(function):
        def counted(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = function(*args, **kwargs)
            counts.append(counter.get_total_flops())
            return out

        return counted

    with monkeypatch.context() as patch:
        patch.setattr(backend, "encode", counting(backend.encode))
        patch.setattr(backend, "kept_features", counting(backend.kept_features))
        patch.setattr(backend, "merge", counting(backend.merge))
        result = run(backend, image, PROMPT, method, 0.2, max_new_tokens=1)
    return result, sum(counts)


@pytest.mark.parametrize("name", REAL)
def test_vision_flops_are_what_torch_counts_and_the_real_model_is_projected(name, monkeypatch):
    """On every family's tiny model, with eager attention (so that torch counts q.k and the weighted sum
    of v): the computed vision FLOPs are within 5% of flop_counter's (they are exact here) for the unreduced
    run, a method that recomputes attention maps, and one that merges; and every run carries the cost of
    the family's published checkpoint, reduced below full wherever fewer tokens reach the LLM."""
    built = backends.load(name, "cpu")
    built.model.set_attn_implementation("eager")
    image = photo(400, 300)
    for method in ("none", "cls", "visionzip"):
        result, counted = counted_run(built, image, method, monkeypatch)
        cost = result.cost
        assert abs(cost["vision_flops"] - counted) <= 0.05 * counted, (method, cost["vision_flops"], counted)
        assert cost["vision_flops"] == sum(cost["vision_flops_parts"].values())
        assert (cost["vision_flops_parts"]["attention_maps"] > 0) == (method != "none")
        projected = cost["projected"]
        assert projected["model"] == REAL[name] and projected["dtype"] == "bfloat16"
        reduced, full = projected["reduced"], projected["full"]
        assert reduced["weight_bytes"] == full["weight_bytes"] == 2 * parameters(backends.stored_config(REAL[name]))
        if method == "none":
            assert reduced == full
        else:
            assert reduced["prefill_flops"] < full["prefill_flops"] and reduced["kv_bytes"] < full["kv_bytes"]
    shape, tokens = Shape.of(backends.stored_config(REAL[name]).get_text_config()), result.tokens
    every = [tokens["text"] + tokens["visual_full"]] * shape.layers  # the real depth, the image's real counts
    assert full["prefill_flops"] == prefill_flops(shape, every) and full["kv_bytes"] == kv_bytes(shape, every, 2)


def test_qwen25_s_maps_are_counted_over_the_windows_of_windowed_blocks_and_the_image_in_the_others():
    """tiny-qwen2.5-vl's blocks 0-2 attend within 112-px windows, block 3 over the whole image; the hooks
    recompute each asked map over the segments its block attends over."""
    built = backends.load("tiny-qwen2.5-vl", "cpu")
    built.model.set_attn_implementation("eager")
    prepared = built.prepare(photo(400, 300), PROMPT)
    windows = built.encoder_windows(prepared)
    assert len(windows) > 1 and sum(windows) == sum(built.encoder_sequences(prepared))
    for needs in [(), ("cls@0", "cls-onehead@1", "cls-logits@2"), ("cls@last", "cls-heads@last", "keys@0")]:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            built.encode(prepared, needs)
        work = VisionPass(tuple(built.encoder_sequences(prepared)), tuple(windows), maps=needs)
        assert vision_flops(Encoder.of(built.model.config), work).total == counter.get_total_flops(), needs


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_weights_counted_from_a_stored_config_are_the_checkpoint_s(name):
    count = parameters(backends.stored_config(name))
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, count


def test_the_real_architecture_is_the_model_s_own_or_the_one_asked_for(backend):
    assert backends.real_architecture(backend) == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert backends.real_architecture(backend, "llava-hf/llava-v1.6-vicuna-13b-hf").endswith("13b-hf")
    full_size = backends.full_size("Qwen/Qwen2-VL-7B-Instruct", torch.device("meta"))
    assert backends.real_architecture(full_size) == "Qwen/Qwen2-VL-7B-Instruct"  # random weights, real size
    with pytest.raises(ExplorerError, match="no stored LLaVA-NeXT architecture 'Qwen/Qwen2-VL-2B-Instruct'"):
        backends.real_architecture(backend, "Qwen/Qwen2-VL-2B-Instruct")


def test_run_json_gives_vision_flops_and_the_projection_asked_for(capsys):
    args = ["run", "--model", "tiny-llava-next", "--image", "assets/chart.png", "--prompt", PROMPT]
    args += ["--method", "hired", "--max-new-tokens", "1", "--json"]
    assert main(args + ["--project-to", "llava-hf/llava-v1.6-vicuna-13b-hf"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert {"prefill_flops", "kv_bytes", "vision_flops", "vision_flops_parts", "projected"} <= set(cost)
    assert cost["projected"]["model"] == "llava-hf/llava-v1.6-vicuna-13b-hf"
    assert cost["projected"]["reduced"]["prefill_flops"] < cost["projected"]["full"]["prefill_flops"]
    assert main(args + ["--project-to", "Qwen/Qwen2-VL-2B-Instruct"]) == 2
    assert "no stored LLaVA-NeXT architecture" in capsys.readouterr().err


def test_the_bench_the_table_and_the_report_show_the_computed_costs(backend):
    rows = bench.sweep(backend, photo(400, 300), PROMPT, ["cls"], [Budget(fraction=0.2)], 1, 1, 0)
    result = run(backend, photo(400, 300), PROMPT, "cls", 0.2, max_new_tokens=1)
    assert rows[1]["vision_tflops"] == result.cost["vision_flops"] / 1e12 > 0
    assert "vision TFLOPs" in bench.table(rows).splitlines()[0]
    titles = [a.text for a in bench.charts({"tiny": rows}).layout.annotations]
    assert "tiny: vision encoder and projector (TFLOPs, from the config)" in titles
    table = {row[0]: row[1:] for row in vis.metrics(result)}
    assert float(table["vision encoder and projector (TFLOPs, computed)"][0]) > 0
    real = "computed: real llava-v1.6-vicuna-7b-hf"
    assert real in table and float(table["  LLM prefill (TFLOPs)"][2].rstrip("x")) < 1
    page = report.page(photo(400, 300), result)
    assert "vision encoder and projector (TFLOPs, computed)" in page and "never measured" in page


def test_the_cost_is_computed_once_per_count_not_at_every_generated_token(backend):
    from explorer.engine.pipeline import stream

    results = list(stream(backend, photo(400, 300), PROMPT, "fastv", 0.6, max_new_tokens=4, min_new_tokens=4))
    assert len(results) == 5 and len({id(r.cost) for r in results}) == 1  # the same counts after the prefill
    assert results[-1].cost == run(backend, photo(400, 300), PROMPT, "fastv", 0.6, max_new_tokens=1).cost
