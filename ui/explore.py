"""Run: the method on the image and prompt, then the full model (once per image, prompt and length), with the
answers streaming, the numbers, the drift, the pictures of what was kept and the report. `/explore`
returns every output of `Explored`, in its order."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import torch

from explorer import Result, load_image, stream
from explorer.engine import fidelity
from explorer.views import report, stages, viewer
from explorer.views import visual as vis

from .form import Form
from .request import Request, request, shows_errors
from .session import GPU, MEMO, Session, digest

TABLE = ["", "reduced", "full", "reduced / full"]


class Explored(NamedTuple):
    """What a run updates, in the order the /explore API returns them; `run` yields them by these names."""

    overlay_0: gr.Image
    overlay_1: gr.Image
    heat_0: gr.Image
    heat_1: gr.Image
    map_choice: gr.Radio
    plot: gr.Plot
    answer: gr.Textbox
    full_answer: gr.Textbox
    table: gr.Dataframe
    strip: gr.HTML
    live: gr.Markdown
    explanation: gr.Markdown
    shown: gr.State  # the last run: {"picture", "result", "full", "drift"}
    memo: gr.State  # the visitor's last MEMO full runs
    viewer: gr.HTML  # the live picture, showing the run's choice
    stages: gr.HTML  # where the time went: the run's stages, reduced and full, and a sentence on them


class Views(NamedTuple):
    """The run's tabs beside the live picture: the budget's chart and the PNG files."""

    plot: gr.Plot
    overlays: list  # thumbnail, crops: kept and dropped, full resolution
    map_choice: gr.Radio
    heats: list  # thumbnail, crops: the chosen map


def tabs() -> Views:
    """The Budget tab and the PNG files of the last run (the page shows the live picture; these are files)."""
    with gr.Tab("Budget"):
        plot = gr.Plot(label="How the budget was spent")
    with gr.Tab("PNG files"):
        gr.Markdown("The last run's pictures at the image's full resolution, to download; click a patch.")
        overlays = pair("thumbnail", "crops")
        map_choice = gr.Radio(["scores"], value="scores", label="Map")
        heats = pair("thumbnail: scores", "crops: scores")
    return Views(plot, overlays, map_choice, heats)


def answers(views: Views, live_picture: gr.HTML) -> Explored:
    """The answers, the table of numbers, the drift strip, the live line and the method in words, under
    the pictures: with `views` and the live picture, every output of a run."""
    with gr.Row():
        answer = gr.Textbox(label="Reduced answer", lines=5, interactive=False)
        full_answer = gr.Textbox(label="Full answer", lines=5, interactive=False)
    strip, live = gr.HTML(), gr.Markdown()
    table = gr.Dataframe(headers=TABLE, interactive=False, wrap=True)
    times = gr.HTML(label="Where the time goes", elem_id="stages")
    explanation = gr.Markdown(vis.explain("hired"))
    return Explored(
        *views.overlays, *views.heats, views.map_choice, views.plot, answer, full_answer, table, strip, live,
        explanation, gr.State(), gr.State({}), live_picture, times,
    )  # fmt: skip


def pair(*labels: str) -> list[gr.Image]:
    """Two pictures side by side: the thumbnail's and the crops'."""
    with gr.Row():
        return [gr.Image(label=label, format="png", interactive=False) for label in labels]


@shows_errors
def run(session: Session, memo: dict | None = None, **given):
    """The method, then the full model unless it ran on this image, prompt and length before (`memo`);
    yields {output name: value} as things change (the names are `Explored`'s)."""
    asked = request(given, prompt=True)
    picture = load_image(asked.image)

    def drawn(reduced) -> tuple[dict, dict]:
        values, looks = pictures(picture, reduced)
        values["viewer"] = last_run(session.key(asked.image), reduced)
        shown = {"picture": picture, "result": reduced, "full": None, "drift": None}
        return {**restyled(values, looks), "explanation": session.explain(asked.method), "shown": shown}, values

    key = (digest(asked.image), asked.prompt, asked.max_new_tokens)
    ran = yield from compared(session, picture, asked, key, memo or {}, drawn)
    yield {
        **ran.last("strip"),
        "explanation": session.explain(asked.method),
        "shown": {"picture": picture, "result": ran.reduced, "full": ran.full, "drift": ran.drift},
    }


class Ran(NamedTuple):
    """What `compared` ran: the reduced run, the full one (None when not compared), the drift and its strip
    of tokens, the visitor's memo of full runs, and the pictures of the reduced run for the last update."""

    reduced: Result
    full: Result | None
    drift: dict | None
    strip: str
    memo: dict
    pictures: dict

    def last(self, strip: str) -> dict:
        """The run's last update, complete, so an API call's result is: the pictures, the answers, the numbers,
        the drift's strip of tokens (output `strip`), where the time went, the speeds and the memo."""
        reduced, full = self.reduced, self.full
        return {
            **self.pictures,
            "answer": reduced.answer,
            "full_answer": full.answer if full else "",
            strip: self.strip,
            "table": vis.metrics(reduced, full, self.drift),
            "stages": "<b>Where the time goes</b>" + stages.html_of(reduced, full),
            "live": speed("reduced", reduced) + (f" · {speed('full', full)}" if full else ""),
            "memo": self.memo,
        }


def compared(session: Session, media, asked: Request, key: tuple, memo: dict, drawn: Callable):
    """The run both modes share, on `media` (an image or a clip): the method, its answer streaming, then
    `drawn(reduced)`'s first dict (its pictures); then the full model unless `memo` holds it under `key`
    (media, prompt, length), streaming, then the drift. Yields {output name: value}; returns what it ran
    (`Ran`, with `drawn`'s second dict), for the mode's last, complete update."""
    full, full_lp = memo.get(key, (None, None)) if asked.compare else (None, None)
    loading = "" if session.loaded else "loading the model (once)… "
    yield {"answer": "", "full_answer": full.answer if full else "", "live": f"{loading}running the method…"}
    backend, ticks = session.backend(), Ticks()
    for r in stream(backend, media, asked.prompt, asked.method, asked.fraction, asked.settings, asked.max_new_tokens):
        if ticks.due(r):  # light updates: drawing now would slow the run
            yield {"answer": r.answer, "table": vis.metrics(r, full), "live": speed("reduced", r)}
    reduced = r
    first, pictured = drawn(reduced)
    yield first
    drift, strip = None, ""
    if asked.compare:
        if full is None:
            for full in stream(backend, media, asked.prompt, "none", 1.0, max_new_tokens=asked.max_new_tokens):
                if ticks.due(full):
                    yield {"full_answer": full.answer, "table": vis.metrics(reduced, full), "live": speed("full", full)}
            full_lp = fidelity.logprobs(backend, media, asked.prompt, full.answer_ids)
            memo = dict(list({**memo, key: (full, full_lp)}.items())[-MEMO:])
        drift, strip = drifted(backend, media, asked, full, full_lp)
    return Ran(reduced, full, drift, strip, memo, pictured)


def drifted(backend, picture, asked: Request, full, full_lp) -> tuple[dict, str]:
    """The full answer scored under the reduced model (one more forward pass, not timed): the drift and
    its strip of tokens shaded by KL."""
    mine = fidelity.logprobs(
        backend, picture, asked.prompt, full.answer_ids, asked.method, asked.fraction, asked.settings
    )
    drift = fidelity.drift(mine, full_lp, full.answer_ids)
    return drift, vis.strip([backend.tokenizer.decode([t]) for t in full.answer_ids], drift)


class Ticks:
    """Streaming updates at most every 0.1 s, and always the last."""

    def __init__(self):
        self.last = 0.0

    def due(self, r) -> bool:
        if r.done or time.monotonic() - self.last > 0.1:
            self.last = time.monotonic()
            return True
        return False


def speed(which: str, r) -> str:
    t = r.timing
    line = f"{which}: {r.tokens['generated']} tokens"
    if t["ttft_s"] is not None:
        line += f", first after {t['ttft_s']:.2f} s"
    if t["decode_tokens_per_s"] is not None:
        line += f", {t['decode_tokens_per_s']:.1f} tokens/s"
    return line + ("" if r.done else " …")


def pictures(picture, r, which: str = "scores", heat_only: bool = False) -> tuple[dict, dict]:
    """The overlay and the heatmap of each view of a run's geometry (None for a view that is not
    there), and each picture's label and visibility."""
    g, selection = r.geometry, r.selection
    views = list(vis.views(g).items())
    maps = {"scores": selection.scores, **selection.maps}
    values, looks = {}, {}
    if not heat_only:
        values |= {"map_choice": which, "plot": vis.budget_figure(r)}
        looks["map_choice"] = {"choices": list(maps)}
    for i in range(2):
        name, tokens = views[i] if i < len(views) else ("", None)
        values[f"heat_{i}"] = None
        shows = maps.get(which)
        if tokens is not None and shows is not None and not shows[tokens].isnan().all():
            values[f"heat_{i}"] = vis.heatmap(picture, g, maps[which], tokens)
        looks[f"heat_{i}"] = {"label": f"{name}: {which} (click a patch)", "visible": tokens is not None}
        if not heat_only:
            values[f"overlay_{i}"] = None if tokens is None else vis.overlay(picture, g, selection, tokens)
            kept = 0 if tokens is None else int(torch.isin(tokens, selection.keep.cpu()).sum())
            label = f"{name}: {kept} of {len(tokens) if tokens is not None else 0} kept (click a patch)"
            looks[f"overlay_{i}"] = {"label": label, "visible": tokens is not None}
    return values, looks


def last_run(key: str, r) -> dict:
    """The live picture's value for a run's choice: what reached the LLM (after the last cut, inside it)."""
    t = r.tokens
    where = "after its last cut inside the LLM" if t["llm_cuts"] else "what reached the LLM"
    line = f"{t['visual_kept']} of {t['visual_full']} visual tokens kept (the last run)"
    return viewer.value(
        key, r.geometry, r.selection, line, f"The last run's choice: {where}; move the budget to preview"
    )


def restyled(values: dict, looks: dict) -> dict:
    """Values as updates that also set each component's label, visibility or choices."""
    return {name: gr.update(value=value, **looks.get(name, {})) for name, value in values.items()}


def remap(which: str, shown) -> dict:
    """The heatmaps redrawn with another of the run's maps."""
    return restyled(*pictures(shown["picture"], shown["result"], which, heat_only=True)) if shown else {}


def click(view: int, shown, x: float, y: float) -> str:
    """What the patch at displayed pixel (x, y) of picture `view` is: partition, cell, score, fate."""
    if not shown:
        return "Run first, then click a patch."
    r = shown["result"]
    views = list(vis.views(r.geometry).values())
    token = vis.token_at(r.geometry, views[view], x, y) if view < len(views) else None
    return "No visual token there." if token is None else vis.describe(r.geometry, r.selection, token)


def download(shown) -> list[str]:
    """The shown run as a self-contained HTML page and its JSON, in a new temporary folder."""
    if not shown:
        raise gr.Error("run first, then download its report")
    folder = Path(tempfile.mkdtemp(prefix="token-drop-report-"))
    name = f"{shown['result'].method}-{shown['result'].tokens['visual_kept']}"
    page = folder / f"{name}.html"
    page.write_text(report.page(shown["picture"], shown["result"], shown["full"], shown["drift"]))
    data = folder / f"{name}.json"
    data.write_text(json.dumps(report.data(shown["result"], shown["full"], shown["drift"]), indent=2))
    return [str(page), str(data)]


def gpu_seconds(memo=None, **given) -> int:
    """How long a ZeroGPU slot a run asks for: generous for a 7B model at ~10 tokens/s."""
    return min(300, 20 + int(given.get("max_new_tokens", 64)) * (2 if given.get("compare", True) else 1) // 10)


class Downloads(NamedTuple):
    export: gr.Button
    exported: gr.File


def downloads() -> Downloads:
    with gr.Row():
        export = gr.Button("Download report", scale=1)
        return Downloads(export, gr.File(label="Report (HTML) and result (JSON)", file_count="multiple", scale=3))


def wire(session: Session, form: Form, out: Explored, files: Downloads, picked: gr.Markdown, queue: dict):
    """Run and Stop, the clicks on the PNG pictures, the heatmap's map and the report; returns the run's
    event (the steps and the picture's refresh follow it)."""

    def explore(memo=None, **given):
        yield from run(session, memo, **given)

    on_gpu = GPU(explore, duration=gpu_seconds)  # on ZeroGPU it runs in a GPU worker process
    components = out._asdict()

    def by_component(memo=None, **given):  # a misspelt output name is a KeyError, not a silent skip
        for changes in on_gpu(memo, **given):
            yield {components[name]: value for name, value in changes.items()}

    asked = form.named("image", "prompt", "method", "budget", "compare", "max_new_tokens")
    running = form.go.click(
        by_component, [out.memo], list(out), inputs_kwargs=asked, api_name="explore", preprocess=False, **queue
    )
    form.stop.click(None, cancels=running, api_name="stop")  # the run stops at its next token
    for i, view in enumerate([(out.overlay_0, out.heat_0), (out.overlay_1, out.heat_1)]):
        for shown in view:
            shown.select(on_click(i), out.shown, picked, api_name=f"click_{i}")
    heats = [out.heat_0, out.heat_1]
    remapped = lambda which, shown: tuple(remap(which, shown).get(f"heat_{i}", gr.skip()) for i in range(2))  # noqa: E731
    out.map_choice.change(remapped, [out.map_choice, out.shown], heats, api_name="map")
    files.export.click(download, out.shown, files.exported, api_name="report")
    return running


def on_click(view: int):
    def clicked(shown, evt: gr.SelectData) -> str:
        return click(view, shown, *evt.index)

    return clicked
