"""The live preview: the vision pass once per image and signal set, then selection alone; the same
choice as a run; never waiting on a running model; what the viewer and the budget animation get."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image, ImageSequence

from explorer import Budget, load_image, run
from explorer.engine.pipeline import model_lock, select
from explorer.methods import METHODS, make, on_images, unavailable
from explorer.views import animation, viewer
from explorer.views.preview import VisionCache, preview

PROMPT = "What is in this picture?"
ASSETS = Path(__file__).parent.parent / "assets"


@pytest.fixture(scope="module")
def picture():
    return photo(600, 400, seed=4)


@pytest.mark.parametrize(
    "method",
    [
        m
        for m in on_images()
        if METHODS[m].stage == "vision" and METHODS[m].merging is None and METHODS[m].early_layer is None
    ],
)
def test_the_preview_keeps_what_a_run_keeps(backend, picture, method):
    shown = preview(backend, picture, method, 0.15)
    ran = run(backend, picture, PROMPT, method, 0.15, max_new_tokens=1)
    assert torch.equal(shown.selection.keep, ran.selection.keep)
    assert not shown.pending and str(shown.count).startswith(
        f"{ran.tokens['visual_kept']} of {len(ran.geometry)} visual"
    )


@pytest.mark.parametrize("method", ["mustdrop", "aim"])
def test_a_two_stage_method_previews_its_step_before_the_llm(backend, method):
    picture = load_image(ASSETS / "coffee.jpg")  # alike windows for MustDrop to merge
    shown = preview(backend, picture, method, 0.3)
    chosen = make(method)
    before = select(backend, picture, PROMPT, chosen, Budget(fraction=0.3), 1).selection
    assert torch.equal(shown.selection.keep, before.keep) and len(before.keep) < len(shown.geometry)
    assert "step before the LLM" in shown.note and not shown.pending


@pytest.mark.parametrize("method", ["fastv", "pdrop", "tome-vit", "gemfilter"])
def test_a_method_that_chooses_inside_the_llm_or_the_encoder_says_it_shows_after_run(backend, picture, method):
    cache = VisionCache()
    shown = preview(backend, picture, method, 0.2, cache=cache)
    assert shown.pending and len(shown.selection.keep) == len(shown.geometry)
    assert "Run" in shown.note and cache.passes == 0  # the geometry alone: no encoder run for nothing
    counted = "kept" if METHODS[method].stage == "vision" else "per LLM layer on average"  # llm stage: a layer mean
    assert (
        str(shown.count) == f"{int(0.2 * len(shown.geometry))} of {len(shown.geometry)} visual tokens {counted} (20%)"
    )


def test_the_vision_pass_runs_once_per_image_and_signal_set_then_only_selection(backend, picture, monkeypatch):
    cache = VisionCache()
    for budget in (0.5, 0.2, 0.05):
        preview(backend, picture, "hired", budget, cache=cache, image="a")
    preview(backend, picture, "hired", 0.2, {"alpha": 0.3}, cache=cache, image="a")
    assert cache.passes == 1
    preview(backend, picture, "cls", 0.2, cache=cache, image="a")  # hired's pass holds cls's signal too
    assert cache.passes == 1
    preview(backend, picture, "visionzip", 0.2, cache=cache, image="a")  # keys and hidden states: a new pass
    assert cache.passes == 2

    monkeypatch.setattr(backend, "encode", None)  # any further encoder run would fail
    shown = preview(backend, picture, "hired", 0.1, cache=cache, image="a")
    assert shown.cached and len(shown.selection.keep) == int(0.1 * len(shown.geometry))


def test_the_cache_is_bounded_and_frees_an_image_when_new_ones_come(backend, picture):
    cache = VisionCache(images=2, entries=3)
    for image in ("a", "b", "c"):
        preview(backend, picture, "cls", 0.2, cache=cache, image=image)
    assert {key[1] for key in cache._seen} == {"b", "c"}  # "a" is gone
    for method in ("hired", "visionzip", "divprune"):
        preview(backend, picture, method, 0.2, cache=cache, image="c")
    assert len(cache) == 3 and all(key[1] == "c" for key in cache._seen)


def test_the_preview_never_waits_on_a_running_model(backend, picture):
    cache = VisionCache()
    preview(backend, picture, "cls", 0.2, cache=cache, image="seen")
    lock, held, done = model_lock(backend.model), threading.Event(), threading.Event()

    def a_run():  # holds the model, as a generation does
        with lock:
            held.set()
            done.wait(30)

    worker = threading.Thread(target=a_run)
    worker.start()
    held.wait(10)
    try:
        cached = preview(backend, picture, "cls", 0.05, cache=cache, image="seen")  # cached signals: no lock
        assert not cached.busy and len(cached.selection.keep) == int(0.05 * len(cached.geometry))
        busy = preview(backend, picture, "cls", 0.05, cache=cache, image="new", wait_s=0.05)
        assert busy.busy and busy.pending and "busy with a run" in busy.note
        assert len(busy.selection.keep) == len(busy.geometry) == len(cached.geometry)
    finally:
        done.set()
        worker.join()
    assert not preview(backend, picture, "cls", 0.05, cache=cache, image="new").busy  # free again


def test_the_viewer_gets_the_kept_set_and_the_views_laid_out_as_tiled(backend, picture):
    shown = preview(backend, picture, "visionzip", 0.2)
    g = shown.geometry
    value = viewer.value("k", g, shown.selection, str(shown.count))
    assert viewer.kept_of(value).tolist() == shown.selection.keep.tolist()
    assert value["groups"] and value["scores"] and len(str(value)) < 40_000
    scene = viewer.scene(picture, g, "k")
    assert [v["name"] for v in scene["views"]] == ["crops", "thumbnail"]
    crops = scene["views"][0]["panels"]
    assert sorted(p["label"] for p in crops) == sorted(n for n in g.names if n.startswith("crop"))
    for a in crops:  # the panels do not touch: each has room for its outline and a label band above it
        for b in crops:
            if a is not b:
                ax1, ay1 = a["dst"][0] + a["src"][2] - a["src"][0], a["dst"][1] + a["src"][3] - a["src"][1]
                bx1, by1 = b["dst"][0] + b["src"][2] - b["src"][0], b["dst"][1] + b["src"][3] - b["src"][1]
                assert ax1 < b["dst"][0] or bx1 < a["dst"][0] or ay1 < b["dst"][1] or by1 < a["dst"][1]
    assert all(p["dst"][1] >= scene["views"][0]["band"] for p in crops)


def test_the_budget_animation_is_a_gif_with_one_frame_per_budget(backend, tmp_path):
    budgets = animation.budgets(7)
    assert budgets[0] == 1.0 and budgets[-1] == 0.05 and budgets == sorted(budgets, reverse=True)
    picture = load_image(ASSETS / "panorama.jpg")
    cache = VisionCache()
    frames = animation.frames(backend, picture, "hired", budgets, cache=cache)
    assert cache.passes == 1 and len({f.size for f in frames}) == 1 and frames[0].width == min(800, picture.width)
    path = animation.gif(frames, tmp_path / "hired.gif")
    gif = Image.open(path)
    assert gif.format == "GIF" and gif.n_frames == len(budgets) == 7 and gif.info["loop"] == 0
    shown = [np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(gif)]
    for made, decoded in zip(frames, shown):  # every frame as drawn, up to the 255-colour palette
        assert np.abs(np.asarray(made, dtype=np.int16) - decoded).mean() < 8
    assert (shown[0] != shown[-1]).any()
    with pytest.raises(Exception, match="inside the LLM"):
        animation.frames(backend, picture, "fastv", budgets)


def test_every_method_that_runs_on_the_model_previews_or_says_why_not(backend, picture):
    cache = VisionCache()
    for name in METHODS:
        if unavailable(name, backend):
            continue
        shown = preview(backend, picture, name, 0.2, cache=cache, image="x")
        assert str(shown.count) and shown.note and len(shown.selection.keep) >= 1, name
