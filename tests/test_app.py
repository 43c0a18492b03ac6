"""The app: its handlers on the tiny model, the launched app through gradio_client, and a real browser."""

import html
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import photo
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
import ui
from explorer import METHODS, load_image, run
from explorer.core import Method, Selection, Signals, fraction_of
from explorer.engine import fidelity
from explorer.evaluation import bench
from explorer.methods import on_images
from explorer.views import teach, viewer
from explorer.views import visual as vis
from ui.explore import Explored
from ui.picture import live_picture, refresh
from ui.session import Newest, Session, digest
from ui.video import Shown

ROOT = Path(__file__).parent.parent
OUTPUTS = Explored._fields


@pytest.fixture(scope="module")
def explorer(backend):
    """The app's session on tiny-llava-next, loaded through its own code path."""
    return Session("tiny-llava-next", "cpu")


@pytest.fixture
def picture_file(tmp_path) -> str:
    path = tmp_path / "photo.png"
    photo(600, 400).save(path)
    return str(path)


def explore(explorer, image, prompt="What is this?", method="hired", budget=20, compare=True, n=6, memo=None, **set):
    """The last yield of the handler, and every yield, as dicts; `set`: settings by API name (hired_alpha)."""
    given = dict(image=image, prompt=prompt, method=method, budget=budget, compare=compare, max_new_tokens=n)
    outputs = list(ui.explore.run(explorer, memo or {}, **given, **set))
    return outputs[-1], outputs


def count(explorer, image, method, budget, **set) -> str:
    """The count line the live picture shows for this image, method and budget."""
    return live_picture(explorer, False, image=image, method=method, budget=budget, **set)[1]


def test_importing_the_app_loads_no_model():
    code = "import app, sys; print(sorted(m for m in sys.modules if 'modeling_' in m))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_overlay_dims_dropped_patches_and_leaves_kept_ones_alone(explorer, picture_file):
    last, outputs = explore(explorer, {"path": picture_file})
    original = np.asarray(load_image(picture_file), dtype=np.int16)
    r = last["shown"]["result"]
    g, keep = r.geometry, set(r.selection.keep.tolist())
    for i, tokens in enumerate(vis.views(g).values()):
        shown = np.asarray(last[f"overlay_{i}"], dtype=np.int16)
        assert shown.shape == original.shape  # the size of the input image
        for token in tokens.tolist():
            x0, y0, x1, y1 = g.boxes[token].round().long().tolist()
            diff = np.abs(shown[y0:y1, x0:x1] - original[y0:y1, x0:x1]).mean()
            if token in keep:
                assert diff == 0, f"kept token {token} was drawn over"
            else:
                assert diff > 10, f"dropped token {token} is not dimmed"
    assert any(o.get("answer") for o in outputs[:-1])  # the answer streamed before the end


def test_numbers_shown_are_the_librarys(explorer, backend, picture_file):
    last, _ = explore(explorer, {"path": picture_file}, method="cls", budget=10)
    r = last["shown"]["result"]
    alone = run(backend, picture_file, "What is this?", "cls", 0.1, max_new_tokens=6)
    assert r.tokens == alone.tokens and torch.equal(r.selection.keep, alone.selection.keep)
    assert last["answer"] == alone.answer
    assert last["full_answer"] == run(backend, picture_file, "What is this?", "none", 1.0, max_new_tokens=6).answer
    rows = {row[0].strip(): row[1:] for row in last["table"]}
    assert rows["visual tokens"] == [str(r.tokens["visual_kept"]), str(r.tokens["visual_full"]), "0.10x"]
    for part in r.tokens["by_partition"]:
        assert rows[part["name"]][:2] == [str(part["kept"]), str(part["full"])]
    assert rows["time to first token (s)"][0] == f"{r.timing['ttft_s']:.3f}"
    assert rows["prefill (s)"][0] == f"{r.timing['prefill_s']:.3f}"
    assert rows["selection (s)"][0] == f"{r.timing['selection_s']:.4f}"
    assert rows["peak memory (cpu, MiB, process high-water mark)"][0] == f"{r.memory['peak_bytes'] / 2**20:.0f}"
    # the budget chart shows the same counts
    bars = {bar.name: list(bar.y) for bar in last["plot"].data}
    assert bars["kept"] == [p["kept"] for p in r.tokens["by_partition"] if p["full"]]
    # where the time went: the reduced and the full run's stages, and what a method before the LLM can save
    full = last["shown"]["full"]
    assert last["stages"].startswith("<b>Where the time goes</b>") and last["stages"].count('height="22"') == 10
    assert f"<title>vision encoder: {r.timing['vision_s']:.3f} s</title>" in last["stages"]
    assert f"<title>vision encoder: {full.timing['vision_s']:.3f} s</title>" in last["stages"]
    assert "A method that acts before the LLM shortens only the prefill and the decode" in last["stages"]


def test_the_full_run_is_reused_for_the_same_image_and_prompt(explorer, picture_file):
    first, _ = explore(explorer, {"path": picture_file}, budget=40)
    ((key, (full, full_logprobs)),) = first["memo"].items()
    again, outputs = explore(explorer, {"path": picture_file}, budget=10, memo=first["memo"])
    assert again["memo"][key][0] is full and again["full_answer"] == full.answer
    assert all(o["full_answer"] == full.answer for o in outputs if "full_answer" in o)  # shown at once
    other, _ = explore(explorer, {"path": picture_file}, prompt="Something else?", memo=first["memo"])
    third, _ = explore(explorer, {"path": picture_file}, prompt="And a third?", memo=other["memo"])
    assert len(other["memo"]) == 2 and list(third["memo"]) == list(other["memo"])[1:] + [(key[0], "And a third?", 6)]


def test_the_drift_from_the_full_answer_is_shown(explorer, backend, picture_file):
    last, _ = explore(explorer, {"path": picture_file}, method="cls", budget=1)
    (full, full_logprobs), r = next(iter(last["memo"].values())), last["shown"]["result"]
    reduced = fidelity.logprobs(backend, picture_file, "What is this?", full.answer_ids, "cls", 0.01)
    drift = fidelity.drift(reduced, full_logprobs, full.answer_ids)
    rows = {row[0].strip(): row[1:3] for row in last["table"]}
    assert rows["full answer, log-prob / token"] == [f"{drift['logprob']:.3f}", f"{drift['full_logprob']:.3f}"]
    assert rows["KL(full || reduced) / token"][0] == f"{drift['kl']:.4f}" and drift["kl"] > 0
    assert last["strip"].count("<span") == len(full.answer_ids) == r.tokens["generated"]
    kept_all, _ = explore(explorer, {"path": picture_file}, method="none", memo=last["memo"])
    rows = {row[0].strip(): row[1:3] for row in kept_all["table"]}
    assert rows["difference"][0] == "+0.000" and rows["greedy choices part at token"][0] == "never"


def test_without_compare_only_the_reduced_run_happens(explorer, picture_file):
    last, _ = explore(explorer, {"path": picture_file}, compare=False)
    assert last["full_answer"] == "" and last["memo"] == {}
    rows = last["table"]  # the run's own numbers; the real checkpoint's computed cost (the last rows) has a full column
    own = rows[: next((i for i, row in enumerate(rows) if row[0].startswith("computed: real")), len(rows))]
    assert len(own) < len(rows) and all(row[2] == "" for row in own)


def test_method_settings_reach_the_method(explorer, picture_file):
    last, _ = explore(explorer, picture_file, method="hired", hired_alpha=0.25, compare=False)
    assert last["shown"]["result"].settings == {"alpha": 0.25, "paper_code": False}
    last, _ = explore(explorer, picture_file, method="random", random_seed=7.0, compare=False)  # sliders send floats
    assert last["shown"]["result"].settings == {"seed": 7}


def test_a_method_that_keeps_everything_is_drawn_without_dimming(explorer, picture_file):
    last, _ = explore(explorer, picture_file, method="none", compare=False)
    original = np.asarray(load_image(picture_file))
    assert np.array_equal(np.asarray(last["overlay_0"]), original)


@pytest.mark.parametrize(
    "image, prompt, budget, message",
    [
        ("corrupt", "What is this?", 20, "bad.jpg (is not an image|could not be decoded)"),
        ("empty", "What is this?", 20, "empty.png is empty"),
        (None, "What is this?", 20, "upload an image"),
        ("good", "   ", 20, "prompt is empty"),
        ("good", "What is this?", 0, "budget"),
        ("good", "What is this?", 101, "budget"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_next_run_works(
    explorer, picture_file, tmp_path, image, prompt, budget, message
):
    files = {"corrupt": tmp_path / "bad.jpg", "empty": tmp_path / "empty.png", "good": Path(picture_file)}
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    files["empty"].write_bytes(b"")
    with pytest.raises(gr.Error, match=message) as error:
        explore(explorer, None if image is None else {"path": str(files[image])}, prompt, budget=budget)
    assert str(tmp_path) not in error.value.message  # the server's paths stay private
    last, _ = explore(explorer, {"path": picture_file}, compare=False)
    assert last["shown"]["result"].done


def test_out_of_memory_is_reported_and_the_app_recovers(explorer, picture_file, monkeypatch):
    model = explorer.backend().model

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model, "generate", no_memory)
    with pytest.raises(gr.Error, match="out of memory"):
        explore(explorer, picture_file, compare=False)
    monkeypatch.undo()
    assert explore(explorer, picture_file, compare=False)[0]["answer"] is not None


def test_the_budget_is_shown_in_tokens_for_the_image(explorer, backend, picture_file, tmp_path):
    n = len(backend.prepare(load_image(picture_file), "x").geometry)
    assert count(explorer, {"path": picture_file}, "hired", 29) == (
        f"**{fraction_of(0.29, n)}** of {n} visual tokens kept (29%) for this 600x400 image."
    )
    assert count(explorer, picture_file, "none", 29).startswith(f"**{n}** of {n} visual tokens kept (no reduction)")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert count(explorer, {"path": str(bad), "orig_name": "mine.png"}, "hired", 20).startswith("⚠️ mine.png ")
    assert "Upload an image" in count(explorer, None, "hired", 20)
    adaptive = count(explorer, picture_file, "prumerge+", 20, prumerge_plus_adaptive=True)
    assert adaptive.startswith(f"{n} visual tokens (adaptive: the method picks its own count)")
    only = count(explorer, picture_file, "mustdrop", 20, prumerge_plus_adaptive=True)  # only prumerge+'s is on
    assert only.startswith("**428** of")
    assert count(explorer, picture_file, "fastv", 60) == (
        f"**{fraction_of(0.6, n)}** of {n} visual tokens per LLM layer on average (60%) for this 600x400 image: "
        f"the layers before fastv's first cut see all {n}, later ones fewer."
    )
    assert count(explorer, picture_file, "fastv", 20) == (  # within reach of LLaVA-1.6-7B's 32 layers
        f"**{fraction_of(0.2, n)}** of {n} visual tokens per LLM layer on average (20%) for this 600x400 image: "
        f"the layers before fastv's first cut see all {n}, later ones fewer."
    )
    low = count(explorer, picture_file, "fastv", 5)  # the first 2 of 32 layers see all: 1 kept averages 134.9
    assert low.endswith(f"⚠️ fastv cannot go below {(2 * n + 30) / 32:.0f} on average here.")
    assert count(explorer, picture_file, "fastv", 20, fastv_budget_after_cuts=True) == (
        f"**{fraction_of(0.2, n)}** of {n} visual tokens left after the last cut (20%) for this 600x400 image."
    )


def test_the_picture_follows_the_budget_without_a_run(explorer, backend, picture_file):
    image = {"path": picture_file}
    value, line, busy = live_picture(explorer, False, image=image, method="hired", budget=20)
    assert line == "**428** of 2144 visual tokens kept (20%) for this 600x400 image." and not busy
    scene = explorer.scene(value["key"])  # what the page asks for once per image
    assert scene["key"] == value["key"] and scene["n"] == value["n"] == 2144 and scene["photo"].startswith("data:")
    assert explorer.scene("some other key") is None
    r = run(backend, load_image(picture_file), "x", "hired", 0.1, max_new_tokens=1)
    value, line, busy = live_picture(explorer, busy, image=image, method="hired", budget=10)
    assert value["text"] == f"{len(r.selection.keep)} of 2144 visual tokens kept (10%)" and "**214** of 2144" in line
    assert viewer.kept_of(value).tolist() == r.selection.keep.tolist()
    assert live_picture(explorer, busy, image=image, method="fastv", budget=10)[0]["pending"]
    assert refresh(explorer, False, image=image, method="hired", budget=10) == (gr.skip(),) * 3  # nothing held it up
    assert refresh(explorer, True, image=image, method="hired", budget=10)[0]["text"].startswith("214 of")
    empty, line, busy = live_picture(explorer, False, image=None, method="hired", budget=20)
    assert empty is None and "Upload an image" in line
    bad = Path(picture_file).with_name("bad.png")
    bad.write_bytes(b"not an image")
    shown = live_picture(explorer, False, image={"path": str(bad), "orig_name": "mine.png"}, method="hired", budget=20)
    assert "⚠️ mine.png " in shown[1]


def test_a_run_shows_its_choice_in_the_picture(explorer, picture_file):
    # at the page's 20%, a layer mean: fastv's first 2 of the 32 layers see every token, the other 30 the kept
    last, _ = explore(explorer, picture_file, method="fastv", budget=20, compare=False, n=2)
    r = last["shown"]["result"]
    assert viewer.kept_of(last["viewer"]).tolist() == r.selection.keep.tolist() and not last["viewer"]["pending"]
    assert last["viewer"]["text"] == f"{len(r.selection.keep)} of 2144 visual tokens kept (the last run)"


def test_the_budget_animation_is_made_from_the_cached_pass(explorer, picture_file):
    shown, download = ui.animation.animate(explorer, 5, image={"path": picture_file}, method="cls")
    assert shown == download and Image.open(shown).n_frames == 5
    with pytest.raises(gr.Error, match="inside the LLM"):
        ui.animation.animate(explorer, 5, image={"path": picture_file}, method="fastv")


def test_clicking_a_patch_tells_its_partition_cell_score_and_fate(explorer, picture_file):
    last, _ = explore(explorer, picture_file, method="cls", compare=False)
    shown = last["shown"]
    r = shown["result"]
    g, keep = r.geometry, r.selection.keep.tolist()
    for view, tokens in enumerate(vis.views(g).values()):
        for token in (tokens[0].item(), tokens[-1].item(), keep[len(keep) // 2]):
            if token not in tokens:
                continue
            x0, y0, x1, y1 = g.boxes[token].tolist()
            text = ui.explore.click(view, shown, (x0 + x1) / 2, (y0 + y1) / 2)
            name, (row, col) = g.names[g.partition[token]], g.cells[token].tolist()
            assert text.startswith(f"token {token}: {name}, cell (row {row}, col {col})")
            assert f"score {r.selection.scores[token].item():.4g}" in text
            assert text.endswith("kept" if token in keep else "dropped")
    assert ui.explore.click(0, None, 1, 1) == "Run first, then click a patch."


def test_the_heatmap_can_show_the_methods_other_maps(explorer, picture_file):
    last, outputs = explore(explorer, picture_file, method="hired", compare=False)
    choices = next(o["map_choice"] for o in outputs if "map_choice" in o)
    assert choices["choices"] == ["scores", "content", "content top"]
    content = ui.explore.remap("content", last["shown"])
    assert content["heat_0"]["label"].endswith("content (click a patch)")
    assert content["heat_1"]["value"] is None  # HiRED's content map lives on the thumbnail only
    assert ui.explore.remap("content", None) == {}


def test_a_model_that_cannot_load_is_said_in_the_status_line(tmp_path):
    status = Session(str(tmp_path / "nowhere"), "cpu").status()
    assert "could not be loaded" in status and "nowhere" in status


def test_every_event_has_an_api_name(explorer):
    demo = ui.build(explorer)
    names = [fn.api_name for fn in demo.fns.values()]
    assert all(names) and {"explore", "preview", "status", "settings", "click_0", "map", "animate"} <= set(names)


@pytest.fixture(scope="module")
def served(explorer):
    demo, url = app.serve(explorer, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_the_launched_app_through_gradio_client(served, tmp_path):
    client = Client(served, verbose=False)
    try:
        out = client.predict(
            image=handle_file(str(ROOT / "assets/coffee.jpg")),
            prompt="What is on the table?",
            method="hired",
            budget=20,
            max_new_tokens=4,
            api_name="/explore",
        )
        result = dict(zip(OUTPUTS, out))
        assert Image.open(result["overlay_0"]).size == (600, 400)
        rows = {row[0]: row[1:] for row in result["table"]["data"]}
        assert rows["visual tokens"] == ["428", "2144", "0.20x"]
        assert isinstance(result["answer"], str) and isinstance(result["full_answer"], str)

        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image at all")
        with pytest.raises(AppError, match="bad.jpg is not an image"):
            client.predict(image=handle_file(str(bad)), api_name="/explore")
        again = dict(
            zip(
                OUTPUTS,
                client.predict(
                    image=handle_file(str(ROOT / "assets/rocket.jpg")), max_new_tokens=2, api_name="/explore"
                ),
            )
        )
        assert Image.open(again["overlay_0"]).size == (140, 427)

        value, count = client.predict(
            image=handle_file(str(ROOT / "assets/coffee.jpg")), method="cls", budget=10, api_name="/preview"
        )
        assert value["text"] == "214 of 2144 visual tokens kept (10%)" and len(viewer.kept_of(value)) == 214
        assert count.startswith("**214** of 2144 visual tokens kept (10%)")
    finally:
        client.close()


COFFEE = str(ROOT / "assets/coffee.jpg")
ASKED = {  # what each endpoint that takes a method and a budget is asked, given right
    "/preview": dict(method="cls", budget=10),
    "/explore": dict(method="cls", budget=10, max_new_tokens=1, compare=False),
    "/versus": dict(method="cls", budget=10, max_new_tokens=1, other="random"),
    "/animate": dict(method="cls", frames=2),
    "/refresh": dict(method="cls", budget=10),
}
BAD = [
    ("budget", 101, "the budget is a percentage of the visual tokens in (0, 100], got 101%"),
    ("budget", -5, "the budget is a percentage of the visual tokens in (0, 100], got -5%"),
    ("budget", 0, "the budget is a percentage of the visual tokens in (0, 100], got 0%"),
    ("method", "nope", "unknown method 'nope'; choose one of: none, random,"),
    ("other", "nope", "unknown method 'nope'; choose one of: none, random,"),
]


@pytest.mark.parametrize("endpoint", list(ASKED))
def test_every_endpoint_refuses_a_budget_or_method_out_of_range_in_the_same_words(served, endpoint):
    client = Client(served, verbose=False)
    try:
        for name, value, message in BAD:
            if name not in ASKED[endpoint]:
                continue
            asked = {**ASKED[endpoint], name: value}
            with pytest.raises(AppError, match=re.escape(message)):
                client.predict(image=handle_file(COFFEE), **asked, api_name=endpoint)
        out = client.predict(image=handle_file(COFFEE), **ASKED[endpoint], api_name=endpoint)
        assert out  # the next request works
    finally:
        client.close()
    with pytest.raises(gr.Error, match=re.escape("unknown method 'nope'")):  # the sweep's methods too
        ui.sweep.sweep(None, ["cls", "nope"], "20", "kl", {}, lambda *a, **k: None, image=COFFEE, prompt="x")


@dataclass(frozen=True)
class Every(Method):
    """Every k-th token: a method defined by this test, to show that a new setting reaches the page and
    the API with no edit in the app."""

    summary: ClassVar[str] = "every k-th visual token in LLM order"
    k: int = field(default=2, metadata={"range": (1, 9), "help": "keep every k-th token"})

    def select(self, s: Signals) -> Selection:
        return Selection(keep=torch.arange(0, len(s.geometry), self.k)[: s.budget])


def test_a_new_method_and_its_setting_need_no_edit_in_the_app(explorer, monkeypatch):
    monkeypatch.setitem(METHODS, "every", Every)
    demo, url = app.serve(explorer, prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False)
    try:
        value, line = client.predict(
            image=handle_file(COFFEE), method="every", budget=10, every_k=3, api_name="/preview"
        )
        assert viewer.kept_of(value).tolist() == list(range(0, 3 * 214, 3)) and line.startswith("**214** of 2144")
        out = client.predict(
            image=handle_file(COFFEE), method="every", budget=10, every_k=5, max_new_tokens=1, compare=False,
            api_name="/explore",
        )  # fmt: skip
        shown = dict(zip([name for name in OUTPUTS if name not in ("shown", "memo")], out))
        assert viewer.kept_of(shown["viewer"]).tolist() == list(range(0, 5 * 214, 5))
    finally:
        client.close()
        demo.close()


def test_a_sweep_equals_single_runs_and_replots_from_its_cache(explorer, backend, picture_file):
    asked = dict(image={"path": picture_file}, prompt="What is this?", max_new_tokens=3)

    def sweep(methods, budgets, cache):
        return ui.sweep.sweep(explorer, methods, budgets, "kl", cache, lambda *a, **k: None, **asked)

    figure, table, rows, cache = sweep(["cls", "random"], "100, 20,5", {})
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "-")] + [
        (m, b) for m in ("cls", "random") for b in ("1", "0.2", "0.05")
    ]
    for row in rows:
        alone = run(
            backend,
            picture_file,
            "What is this?",
            row["method"],
            1.0 if row["budget"] == "-" else float(row["budget"]),
            max_new_tokens=3,
            min_new_tokens=3,
        )
        assert (row["visual_kept"], row["answer"]) == (alone.tokens["visual_kept"], alone.answer)
    assert [trace.name for trace in figure.data] == ["cls", "random"]
    assert list(figure.data[0].x) == [107, 428, 2144] and [t[0] for t in table] == [r["method"] for r in rows]

    calls = []
    hook = backend.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = sweep(["cls", "random"], "100, 20,5", cache)  # everything cached
        assert again[1] == table and not calls
        replot = bench.figure(again[2], "ttft_s")  # the time to first token also draws the floor
        assert [trace.name for trace in replot.data] == ["cls", "random", "floor (k tokens, no selection)"]
        assert list(replot.data[2].x) == [107, 428, 2144] and not calls
    finally:
        hook.remove()
    floors = {(k, r["visual_kept"]) for k, r in cache[next(iter(cache))].items() if k[0] == "uniform"}
    assert floors == {(("uniform", "107 tokens", 1), 107), (("uniform", "428 tokens", 1), 428)}
    assert all(r["floor_ttft_s"] > 0 and r["over_floor"] > 0 for r in rows)
    with pytest.raises(
        gr.Error, match=re.escape("the budget is a percentage of the visual tokens in (0, 100], got 0%")
    ):
        sweep(["cls"], "0,20", {})


def test_the_report_is_a_self_contained_page_and_its_json(explorer, picture_file):
    last, _ = explore(explorer, {"path": picture_file}, method="hired")
    page, data = ui.explore.download(last["shown"])
    text = Path(page).read_text()
    assert text.count("data:image/png;base64,") == 4 and "src='http" not in text
    assert html.escape(last["answer"]) in text and html.escape(last["full_answer"]) in text
    result = json.loads(Path(data).read_text())
    assert result["method"] == "hired" and result["full"]["method"] == "none"
    assert result["fidelity"]["kl"] >= 0 and result["versions"]["transformers"] == "5.23.0"
    with pytest.raises(gr.Error, match="run first"):
        ui.explore.download(None)


def test_two_methods_side_by_side_show_where_they_agree(explorer, backend, picture_file):
    asked = dict(image=picture_file, prompt="What is this?", method="hired", budget=20, max_new_tokens=3)
    *pictures, answer_a, answer_b, table = ui.versus.versus(explorer, "random", **asked)
    a = run(backend, picture_file, "What is this?", "hired", 0.2, max_new_tokens=3)
    b = run(backend, picture_file, "What is this?", "random", 0.2, max_new_tokens=3)
    assert (answer_a, answer_b) == (a.answer, b.answer)
    original = np.asarray(load_image(picture_file), dtype=int)
    g, keep_a, keep_b = a.geometry, set(a.selection.keep.tolist()), set(b.selection.keep.tolist())
    for update, tokens in zip(pictures, vis.views(g).values()):
        drawn = np.asarray(update["value"], dtype=int)
        both = keep_a & keep_b & set(tokens.tolist())
        assert update["label"].split(": ", 1)[1].startswith(f"both {len(both)}, only A ")
        for token in tokens.tolist()[::7]:
            x0, y0, x1, y1 = g.boxes[token].round().long().tolist()
            patch, plain = drawn[y0:y1, x0:x1], original[y0:y1, x0:x1]
            if token in both:
                assert (patch == plain).all()
            elif token in keep_a:  # tinted blue
                assert patch[..., 2].mean() > patch[..., 0].mean() and not (patch == plain).all()
            elif token in keep_b:  # tinted orange
                assert patch[..., 0].mean() > patch[..., 2].mean() and not (patch == plain).all()
            else:
                assert patch.mean() < plain.mean()
    rows = {row[0]: row[1:3] for row in table}
    assert rows["visual tokens"] == [str(len(keep_a)), str(len(keep_b))]


@pytest.mark.parametrize("method", on_images())
def test_the_steps_render_for_every_method(explorer, picture_file, method):
    budget = 80 if METHODS[method].stage == "llm" else 20  # a layer mean all meet: PDrop's 8 of 32 layers see all
    last, _ = explore(explorer, picture_file, method=method, budget=budget, compare=False, n=1)
    steps = teach.steps(last["shown"]["picture"], last["shown"]["result"])
    assert steps and all(isinstance(image, Image.Image) and caption for image, caption in steps)
    if method == "none":
        assert "no steps to show" in steps[0][1]
    else:
        assert steps[-1][1].startswith("What reaches the LLM")
        maps = last["shown"]["result"].selection.maps
        for name in maps:  # every intermediate map is a step, with its caption
            assert any(teach.CAPTIONS.get(name, f"“{name}”") in caption for _, caption in steps)
    cards = viewer.cards(steps)  # every caption in full, under its picture
    assert cards.count("<figure>") == len(steps) and all(html.escape(caption) in cards for _, caption in steps)


def test_the_layer_explorer_shows_any_layer_and_head_and_a_patch_by_layer(explorer, backend, picture_file):
    read, layer, heads, *pictures = ui.layers.read(explorer, image={"path": picture_file}, prompt="What is this?")
    maps = read["maps"]
    assert (
        maps.shape == (backend.vision_layers, len(read["geometry"]), 4)
        and layer["maximum"] == backend.vision_layers - 1
    )
    prepared = backend.prepare(load_image(picture_file), "What is this?")
    _, signals = backend.encode(prepared, ("cls@0", "cls@feature"))
    torch.testing.assert_close(maps[0].sum(1), signals["cls@0"], equal_nan=True)
    torch.testing.assert_close(maps[backend.feature_layer].sum(1), signals["cls@feature"], equal_nan=True)
    assert heads["choices"] == ["all heads, summed", "head 0", "head 1", "head 2", "head 3"]
    one = ui.layers.layer_pictures(read, 0, "head 2")
    assert one[0]["label"] == "thumbnail: layer 0, head 2" and one[0]["value"].size[0] == 600
    g = read["geometry"]
    x0, y0, x1, y1 = g.boxes[5].tolist()
    figure, text = ui.layers.layer_profile(read, 0, "head 1", (x0 + x1) / 2, (y0 + y1) / 2)
    assert list(figure.data[0].y) == maps[:, 5, 1].tolist() and text.startswith("token 5: base")


def test_an_older_preview_that_finishes_last_changes_nothing():
    previews = Newest(visitors=2)
    first, second = previews.ask("a"), previews.ask("a")  # two of one visitor's previews overlap
    other = previews.ask("b")
    assert not previews.newest(first) and previews.newest(second) and previews.newest(other)
    previews.ask("c")  # a third visitor: the oldest is forgotten, and the bound holds
    assert len(previews._asked) == 2 and not previews.newest(second)


def test_the_status_says_whose_times_a_random_weight_model_gives(explorer):
    status = explorer.status()
    assert "**random weights**" in status and "costs are real" not in status
    assert "times and memory are this small model's, not llava-hf/llava-v1.6-vicuna-7b-hf's" in status


# The video mode (ui/video.py), on tiny-llava-onevision: a clip of 3 frames of 196 tokens and a newline


def kept_in_strip(strip: str) -> list[tuple[int, int]]:
    return [(int(k), int(n)) for k, n in re.findall(r"<b>(\d+)</b> of (\d+) kept", strip)]


def test_the_clip_preview_is_what_a_run_keeps_frame_by_frame_from_one_cached_pass(clip_session, clip_file):
    from explorer.engine.video import load_video

    shown = ui.video.live(clip_session, 1, clip=clip_file, frames=3, method="divprune", budget=20)
    r = run(clip_session.backend(), load_video(clip_file, frames=3), "Hi", "divprune", 0.2, max_new_tokens=1)
    assert torch.equal(shown["shown"]["selection"].keep, r.selection.keep)  # the preview keeps what Run keeps
    frames = [p for p in r.tokens["by_partition"] if p["name"].startswith("frame")]
    assert kept_in_strip(shown["strip"]) == [(p["kept"], p["full"]) for p in frames]
    assert len(viewer.kept_of(shown["viewer"])) == frames[1]["kept"] and shown["viewer"]["n"] == 196  # frame 1
    assert shown["count"].startswith("117 of 589 visual tokens kept (20%) · 3 frames of 64x32, 1.2 s")
    assert [bar.y for bar in shown["per_frame"].data] == [(196,) * 3, tuple(p["kept"] for p in frames)]
    passes = clip_session.clips.passes
    again = ui.video.live(clip_session, 2, clip=clip_file, frames=3, method="divprune", budget=40)
    assert clip_session.clips.passes == passes  # a new budget: only the selection ran, on the cached pass
    assert sum(k for k, _ in kept_in_strip(again["strip"])) == fraction_of(0.4, 589)
    assert ui.video.frame_value(again["shown"], 0)["key"].endswith(" @0")  # the slider: no model work
    scene = clip_session.frame_scene(again["shown"]["key"] + " @2")
    assert scene["n"] == 196 and scene["names"] == ["frame 2"]


def test_a_run_on_a_clip_shows_both_answers_the_numbers_the_drift_and_the_waterfall(clip_session, clip_file):
    from explorer.engine.video import load_video

    given = dict(clip=clip_file, frames=3, method="fastv", budget=75, prompt="What?", max_new_tokens=3)
    last = list(ui.video.run(clip_session, {}, 0, **given))[-1]
    backend, clip = clip_session.backend(), load_video(clip_file, frames=3)
    reduced = run(backend, clip, "What?", "fastv", 0.75, max_new_tokens=3)
    full = run(backend, clip, "What?", "none", 1.0, max_new_tokens=3)
    assert (last["answer"], last["full_answer"]) == (reduced.answer, full.answer)
    rows = {row[0]: row[1:] for row in last["table"]}
    assert rows["visual tokens"][:2] == [str(reduced.tokens["visual_kept"]), "589"]
    assert "  KL(full || reduced) / token" in rows and "KL" in last["drift"]  # the fidelity, as for an image
    patches = sum(backend.encoder_sequences(backend.prepare_video(clip.frames, "Hi", clip.times_s)))
    per_layer = reduced.tokens["visual_per_layer"]  # fastv cuts inside the LLM: one bar per layer
    assert last["waterfall"].data[0].y == (3, patches, 589, 589, *per_layer) and per_layer[-1] < 589
    assert last["count"] == f"{reduced.tokens['visual_kept']} of 589 visual tokens kept (the last run)"
    page, data = ui.explore.download(last["ran"])  # the report: the strip of frames, the answers, the numbers
    text = Path(page).read_text()
    kept = [k for k, _ in kept_in_strip(text)]  # each frame's kept count, under its thumbnail
    assert len(kept) == 3 and sum(kept) == len(reduced.selection.keep) and "src='http" not in text
    assert text.count("data:image/jpeg;base64,") == 3 and "<p>3 frames of 64x32 from a 1.2 s clip.</p>" in text
    assert html.escape(last["answer"]) in text and html.escape(last["full_answer"]) in text
    assert json.loads(Path(data).read_text())["tokens"]["visual_full"] == 589


def test_video_methods_are_offered_only_for_clips_and_image_only_ones_are_refused_with_their_reason(
    clip_session, clip_file
):
    backend = clip_session.backend()
    offered = [name for _, name in ui.video.choices(backend)]
    assert "frames" in offered and "frames" not in on_images()  # a video method: only in video mode
    video_first = ["clip" in METHODS[name].requires for name in offered]
    assert video_first == sorted(video_first, reverse=True)  # the video methods first
    assert {"uniform", "random", "divprune", "fastv"} <= set(offered) and "tome-vit" not in offered
    assert "globalcom2" not in offered
    whole = kept_in_strip(ui.video.live(clip_session, 0, clip=clip_file, frames=3, method="frames", budget=34)["strip"])
    assert sum(k for k, _ in whole) == fraction_of(0.34, 589) and (196, 196) in whole  # a whole frame, previewed
    _, refused = ui.video.for_model(clip_session)
    assert "ToMeViT merges patches inside the vision encoder" in refused
    assert "GlobalCom2 needs a thumbnail" in refused or "globalcom2 needs a thumbnail" in refused
    with pytest.raises(gr.Error, match="merges patches inside the vision encoder"):
        list(ui.video.run(clip_session, {}, 0, clip=clip_file, method="tome-vit", budget=20, prompt="What?"))


def test_two_methods_on_a_clip_show_where_they_agree_frame_by_frame(clip_session, clip_file):
    from explorer.engine.video import load_video

    given = dict(frames=3, prompt="What?", method="vidcom2", budget=25, max_new_tokens=2)
    strip, answer_a, answer_b, table = ui.video_versus.versus(clip_session, "uniform", image=clip_file, **given)
    clip, backend = load_video(clip_file, frames=3), clip_session.backend()
    a = run(backend, clip, "What?", "vidcom2", 0.25, max_new_tokens=2)
    b = run(backend, clip, "What?", "uniform", 0.25, max_new_tokens=2)
    assert (answer_a, answer_b) == (a.answer, b.answer)
    keep_a, keep_b, g = set(a.selection.keep.tolist()), set(b.selection.keep.tolist()), a.geometry
    drawn = re.findall(r"<figcaption>(frame \d+)<br>both (\d+), only A (\d+), only B (\d+), neither (\d+)", strip)
    expected = []
    for p in g.frames:
        tokens = set(g.members(p).tolist())
        both, only_a, only_b = keep_a & keep_b & tokens, (keep_a - keep_b) & tokens, (keep_b - keep_a) & tokens
        counts = (len(both), len(only_a), len(only_b), len(tokens) - len(both) - len(only_a) - len(only_b))
        expected.append((g.names[p], *map(str, counts)))
    assert drawn == expected and len(drawn) == 3 and strip.count("data:image/jpeg;base64,") == 3
    assert any(int(only_a) for _, _, only_a, _, _ in drawn)  # they differ somewhere
    assert {row[0]: row[1:3] for row in table}["visual tokens"] == [str(len(keep_a)), str(len(keep_b))]
    with pytest.raises(gr.Error, match="merges patches inside the vision encoder"):
        ui.video_versus.versus(clip_session, "tome-vit", image=clip_file, **given)
    with pytest.raises(gr.Error, match="upload a clip first"):
        ui.video_versus.versus(clip_session, "uniform", **given)


def test_a_sweep_on_the_video_tab_s_clip_equals_single_runs_on_its_frames(clip_session, clip_file):
    from explorer.engine.video import load_video

    asked = dict(clip=clip_file, frames=3, prompt="What?", max_new_tokens=2)
    figure, table, rows, cache = ui.sweep.sweep(
        clip_session, ["frames", "vidcom2"], "50,25", "kl", {}, lambda *a, **k: None, "clip", **asked
    )
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "-")] + [
        (m, b) for m in ("frames", "vidcom2") for b in ("0.5", "0.25")
    ]
    clip = load_video(clip_file, frames=3)
    for row in rows[1:]:
        alone = run(clip_session.backend(), clip, "What?", row["method"], float(row["budget"]), max_new_tokens=2)
        assert (row["visual_kept"], row["visual_full"], row["answer"]) == (
            alone.tokens["visual_kept"],
            589,
            alone.answer,
        )
    assert [trace.name for trace in figure.data] == ["frames", "vidcom2"] and len(table) == len(rows)
    assert list(cache) == [(digest(clip_file), 3, "What?", 2)]  # the clip's cells, apart from any image's
    offered = ui.sweep.offered("clip", clip_session)["choices"]
    assert "vidcom2" in offered and "globalcom2" not in offered and "none" not in offered
    with pytest.raises(gr.Error, match="upload a clip first"):
        ui.sweep.sweep(clip_session, ["uniform"], "50", "kl", {}, lambda *a, **k: None, "clip", prompt="What?")


@pytest.fixture(scope="module")
def served_clips(clip_session):
    demo, url = app.serve(clip_session, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_bad_clips_get_one_clear_message_each_and_the_next_run_works(served_clips, clip_file, tmp_path, monkeypatch):
    from test_video import write, write_audio

    from explorer.engine import video

    asked = dict(frames=2, method="uniform", budget=20, max_new_tokens=1, compare=False, api_name="/video")
    names = Shown._fields
    client = Client(served_clips, verbose=False)
    try:
        good = dict(zip(names, client.predict(clip=handle_file(clip_file), **asked)))
        assert good["count"] == "78 of 393 visual tokens kept (the last run)"  # 2 frames, 20%
        (tmp_path / "empty.mp4").write_bytes(b"")
        whole = write(tmp_path / "whole.mp4", "libx264").read_bytes()  # its index is at the end, cut off here
        cut = tmp_path / "cut.mp4"
        cut.write_bytes(whole[: len(whole) // 2])
        bad = [
            (tmp_path / "empty.mp4", r"empty.mp4 is empty \(0 bytes\)"),
            (cut, "cut.mp4 is corrupt or truncated"),
            (write_audio(tmp_path / "sound.mp4", "aac"), "sound.mp4 has only audio, no video stream"),
        ]
        for path, message in bad:
            with pytest.raises(AppError, match=message):
                client.predict(clip=handle_file(str(path)), **asked)
        monkeypatch.setattr(video, "MAX_DURATION_S", 1)  # a count of frames not sampled before: decoded anew
        with pytest.raises(AppError, match="clip.mp4 is too long: 1 s, the limit is 1 s"):
            client.predict(clip=handle_file(clip_file), **{**asked, "frames": 3})
        monkeypatch.setattr(video, "MAX_VIDEO_BYTES", 100)
        with pytest.raises(AppError, match="clip.mp4 is too large: .* the limit for a video is"):
            client.predict(clip=handle_file(clip_file), **{**asked, "frames": 4})
        monkeypatch.undo()
        again = dict(zip(names, client.predict(clip=handle_file(clip_file), **asked)))
        assert again["count"] == good["count"]
        preview = dict(zip(["count"], client.predict(clip=handle_file(str(cut)), api_name="/video_preview")))
        assert "cut.mp4 is corrupt" in preview["count"]  # the preview says it on the page, in the count line
        gif = write(tmp_path / "moving.gif", "gif", count=4)  # an animated GIF is a clip too
        preview = dict(zip(["count"], client.predict(clip=handle_file(str(gif)), frames=2, api_name="/video_preview")))
        assert preview["count"].startswith("78 of 393 visual tokens kept (20%) · 2 frames of 64x32")
    finally:
        client.close()


def test_an_image_over_20_mb_is_refused_by_the_app(served, monkeypatch):
    from ui import request

    monkeypatch.setattr(request, "IMAGE_BYTES", 1000)
    client = Client(served, verbose=False)
    try:
        with pytest.raises(AppError, match=r"coffee.jpg is too large: 0 MB, the limit for it is 0 MB"):
            client.predict(image=handle_file(COFFEE), max_new_tokens=1, compare=False, api_name="/explore")
    finally:
        client.close()


def test_qwen2_vl_s_temporal_groups_are_one_picture_each(clip_file):
    """Qwen2-VL folds each pair of frames into one group of tokens: the strip and the slider step by group."""
    session = Session("tiny-qwen2-vl", "cpu")
    shown = ui.video.live(session, 1, clip=clip_file, frames=4, method="tome", budget=30)
    g = shown["shown"]["geometry"]
    assert [g.names[p] for p in g.frames] == ["frames 0-1", "frames 2-3"] and len(kept_in_strip(shown["strip"])) == 2
    assert shown["viewer"]["text"].endswith("· frames 2-3 shown") and "palette" in shown["viewer"]  # tome merges
    assert session.frame_scene(shown["shown"]["key"] + " @1")["views"][0]["panels"][0]["label"] == "frames 2-3"


@dataclass(frozen=True)
class EveryFrame(Every):
    """Every k-th token of the whole clip: a video method defined by this test."""

    requires: ClassVar[tuple[str, ...]] = ("clip",)
    on_clips: ClassVar[str] = "clip"


def test_a_video_method_s_setting_is_in_the_video_tab_and_reaches_the_method(clip_session, clip_file, monkeypatch):
    monkeypatch.setitem(METHODS, "every-frame", EveryFrame)
    with gr.Blocks():
        asked, *_ = ui.video.build(clip_session)
    assert "every_frame_k" in asked.settings and "every_k" not in asked.settings  # the video methods' only
    visible = [update["visible"] for update in ui.video.shown_settings(asked, "every-frame")]
    assert [name for name, shown in zip(asked.settings, visible) if shown] == ["every_frame_k"]
    out = ui.video.live(clip_session, 0, clip=clip_file, frames=3, method="every-frame", budget=10, every_frame_k=3)
    assert out["shown"]["selection"].keep.tolist() == list(range(0, 3 * 58, 3))  # 10% of 589, every 3rd
