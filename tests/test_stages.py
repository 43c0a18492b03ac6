"""Issue 28's stage breakdown: a run's measured time split into preprocessing, vision encoder, selection, LLM
prefill and decode, drawn as one stacked bar per run (the report, the app, the bench chart), with a sentence
on where the model spends its time."""

import re

import pytest
from conftest import photo

import backends
from explorer.engine.pipeline import run
from explorer.views import report, stages

PROMPT = "What is in this picture?"


@pytest.fixture(scope="module")
def runs():
    backend = backends.load("tiny-llava-onevision", "cpu")
    image = photo(400, 300)
    reduced = run(backend, image, PROMPT, "cls", 0.2, max_new_tokens=4, min_new_tokens=4)
    full = run(backend, image, PROMPT, "none", max_new_tokens=4, min_new_tokens=4)
    return image, reduced, full


def test_the_stages_add_up_to_the_run_s_total_and_to_its_time_to_first_token(runs):
    _, reduced, _ = runs
    seconds = stages.split(reduced.timing)
    assert list(seconds) == list(stages.STAGES) and all(v >= 0 for v in seconds.values())
    assert sum(seconds.values()) == pytest.approx(reduced.timing["total_s"])
    assert sum(v for k, v in seconds.items() if k != "decode") == pytest.approx(reduced.timing["ttft_s"])
    assert seconds["vision encoder"] == reduced.timing["vision_s"] > 0 and seconds["decode"] > 0


def test_the_bars_are_drawn_to_one_scale_with_a_key(runs):
    _, reduced, full = runs
    picture = stages.svg({"reduced": reduced.timing, "full": full.timing})
    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="\d+" width="([\d.]+)" height="22"', picture)]
    assert len(widths) == 2 * len(stages.STAGES)
    totals = sum(widths[:5]), sum(widths[5:])
    ratio = reduced.timing["total_s"] / full.timing["total_s"]
    assert totals[0] / totals[1] == pytest.approx(ratio, rel=0.01)
    assert all(f">{stage}</text>" in picture for stage in stages.STAGES)  # the key
    assert "<title>vision encoder: " in picture  # each piece says its seconds on hover


def test_the_sentence_says_where_the_time_goes_and_what_a_method_before_the_llm_can_save(runs):
    _, reduced, full = runs
    words = stages.sentence(reduced, full)
    seconds = stages.split(full.timing)
    share = seconds["vision encoder"] / (full.timing["ttft_s"])
    assert f"the unreduced run spends {share:.0%} of its time to first token in the vision encoder" in words
    assert "only tome-vit" in words
    parts = reduced.cost["vision_flops_parts"]
    assert parts["attention_maps"] > 0  # cls on SigLIP recomputes the attention each patch receives
    assert f"{parts['attention_maps'] / reduced.cost['vision_flops']:.0%} of the vision stage's FLOPs" in words
    assert "llava-onevision-qwen2-0.5b-ov-hf, computed" in words  # a random-weight model: the real one's split
    assert "attention maps" not in stages.sentence(full)  # no signal read, none recomputed


def test_the_report_shows_the_breakdown(runs):
    image, reduced, full = runs
    page = report.page(image, reduced, full)
    assert "<h2>Where the time goes</h2>" in page and page.count('height="22"') == 10
