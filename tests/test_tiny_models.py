"""The tiny random-weight models have their checkpoint's LLM depth and positions, with tiny widths (issue 27):
what runs on the checkpoint runs on its tiny model at the same budgets. The values are checked against the
published configs (tests/mirrors/, with transformers' defaults for what a config leaves out) and the stored
ones (backends/configs/)."""

from pathlib import Path

import pytest
import torch
from mirrors import build
from test_families import loaded
from transformers import CONFIG_MAPPING

import backends
import ui
from explorer import load_image, run
from ui.session import Session

ROOT = Path(__file__).parent.parent
CHECKPOINTS = {  # tiny model -> the checkpoint it follows, its LLM's layers and positions
    "tiny-llava-1.5": ("llava-hf/llava-1.5-7b-hf", 32, 4096),
    "tiny-llava-next": ("llava-hf/llava-v1.6-vicuna-7b-hf", 32, 4096),
    "tiny-llava-onevision": ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 24, 32768),
    "tiny-qwen2-vl": ("Qwen/Qwen2-VL-2B-Instruct", 28, 32768),
    "tiny-qwen2.5-vl": ("Qwen/Qwen2.5-VL-3B-Instruct", 36, 128000),
    "tiny-qwen3-vl": ("Qwen/Qwen3-VL-2B-Instruct", 28, 262144),
    "tiny-idefics3": ("HuggingFaceTB/SmolVLM-256M-Instruct", 30, 8192),
    "tiny-smolvlm": ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", 30, 8192),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_tiny_model_has_its_checkpoints_llm_depth_and_positions_and_tiny_widths(name):
    checkpoint, layers, positions = CHECKPOINTS[name]
    config, _ = backends.RANDOM[name](name)
    assert backends.BACKENDS[config.model_type].default == checkpoint  # its family's published checkpoint
    published = build.published(checkpoint.replace("/", "--"))
    mirror = CONFIG_MAPPING[published["model_type"]].from_dict(published).text_config
    stored = backends.stored_config(checkpoint).text_config
    for text in (config.text_config, mirror, stored):
        assert (text.num_hidden_layers, text.max_position_embeddings) == (layers, positions)
    assert config.text_config.hidden_size == 32 < stored.hidden_size  # the widths stay tiny


@pytest.fixture(scope="module")
def fallback():
    """The app's session on tiny-idefics3, what `python app.py` serves on a CPU with no model reachable."""
    return Session("tiny-idefics3", "cpu", warm_up=False)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_the_apps_fallback_runs_fastv_and_dart_at_the_pages_20_percent(fallback, method):
    given = dict(image=str(ROOT / "assets" / "coffee.jpg"), prompt="What is on the table?", method=method)
    last = list(ui.explore.run(fallback, {}, **given, budget=20, compare=False, max_new_tokens=1))[-1]
    t = last["shown"]["result"].tokens
    # 832 visual tokens (13 tiles of 64), B = 20% = 166 per layer on average over SmolVLM-256M's 30 layers;
    # the cut before layer 2 (K = 2): layers 0-1 see 832, layers 2-29 the R kept, the largest R with
    # (2 * 832 + 28 R) / 30 <= 166 is R = floor((30 * 166 - 1664) / 28) = floor(118.4) = 118
    assert (t["visual_full"], t["visual_budget"], t["visual_kept"]) == (832, 166, 118)
    assert [(c["layer"], c["kept"]) for c in t["llm_cuts"]] == [(2, 118)]
    assert t["visual_layer_mean"] == (2 * 832 + 28 * 118) / 30 == 165.6


def test_tiny_llava_onevision_takes_the_chart_unreduced():
    """The chart's 5157 visual tokens exceeded the old 4096 positions; the checkpoint's 32768 take them."""
    backend = loaded("tiny-llava-onevision")
    assert backend.max_positions == 32768
    result = run(
        backend, load_image(ROOT / "assets" / "chart.png"), "What does this chart show?", "none", max_new_tokens=1
    )
    assert result.tokens["visual_full"] == result.tokens["visual_kept"] == 5157 > 4096
    assert result.done


PLACEHOLDERS = {"tiny-llava-next": ["<image>"], "tiny-llava-onevision": ["<image>", "<video>"]}
PLACEHOLDERS |= {"tiny-qwen2-vl": ["<|image_pad|>", "<|video_pad|>"], "tiny-idefics3": ["<image>"]}


@pytest.mark.parametrize("name", PLACEHOLDERS)
def test_a_tiny_model_never_answers_with_its_visual_placeholders(name):
    """Their output rows are zero (a logit of 0, below the largest): an answer holding one could not be read
    back after the prompt, and the drift of the app and of --fidelity could not be scored."""
    backend = loaded(name)
    ids = backend.tokenizer.convert_tokens_to_ids(PLACEHOLDERS[name])
    assert backend.image_token_id == ids[0]
    rows = backend.model.get_output_embeddings().weight[ids]  # (P, D)
    assert torch.equal(rows, torch.zeros_like(rows))
    answer = run(backend, load_image(ROOT / "assets" / "coffee.jpg"), "What is on the table?", max_new_tokens=8)
    assert not set(ids) & set(answer.answer_ids)
