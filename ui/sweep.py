"""Sweep: methods x budgets on the current image and prompt, one run each with a fixed answer length, against
the visual tokens kept, beside the unreduced run and the floor; cells measured before are reused, and a
change of the plotted number redraws without running the model."""

from __future__ import annotations

from typing import NamedTuple

import gradio as gr

from explorer import Budget, ExplorerError, load_image
from explorer.evaluation import bench
from explorer.methods import on_images

from .form import Form
from .request import check_budget, check_method, request, shows_errors
from .session import GPU, MEMO, Session, digest, video
from .video import Inputs, asked_clip, choices, frame_default

HEADERS = [*bench.HEAD, "answer"]


class Sweep(NamedTuple):
    media: gr.Radio  # the image on the left, or the Video tab's clip
    methods: gr.CheckboxGroup
    budgets: gr.Textbox
    column: gr.Dropdown
    go: gr.Button
    plot: gr.Plot
    rows: gr.Dataframe
    measured: gr.State  # the rows behind the plot
    cache: gr.State  # the visitor's cells, by image, prompt and length


def build() -> Sweep:
    media = gr.Radio(
        [("the image", "image"), ("the Video tab's clip", "clip")], value="image", label="Sweep on",
        info="a clip: its frames as the Video tab samples them, and the methods that run on a clip",
    )  # fmt: skip
    with gr.Row():
        methods = gr.CheckboxGroup(on_images()[1:], value=["cls", "hired", "random"], label="Methods")
        budgets = gr.Textbox("100,60,40,20,10,5", label="Budgets (%)")
    with gr.Row():
        column = gr.Dropdown([(t, k) for k, t in bench.PLOTS.items()], value="ttft_s", label="Plot")
        go = gr.Button("Run the sweep")
    plot = gr.Plot(label="Against the visual tokens kept")
    rows = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True)
    return Sweep(media, methods, budgets, column, go, plot, rows, gr.State([]), gr.State({}))


@shows_errors
def sweep(session: Session, methods, budgets, column, cache, progress=gr.Progress(), media="image", **given) -> tuple:
    """Every chosen method at every budget (one run each) on the image, or on the Video tab's clip (`media`
    "clip": `clip` and `frames` given), measured against the unreduced run and the floor (`uniform` keeping as
    many tokens, no selection work). Returns the chart, the table, the rows and the cache."""
    if not methods:
        raise ExplorerError("pick at least one method to sweep")
    methods = [check_method(m) for m in methods]
    fractions = percents(budgets)
    if media == "clip":
        asked, frames = asked_clip(given, frame_default(session), prompt=True)
        picture, key = video(asked.image, frames), (digest(asked.image), frames)
    else:
        asked = request(given, prompt=True)
        picture, key = load_image(asked.image), (digest(asked.image),)
    n = asked.max_new_tokens
    key = (*key, asked.prompt, n)
    done = dict(cache.get(key, {}))
    progress(0, desc="starting" if session.loaded else "loading the model")
    backend = session.backend()

    def step(i, total, method, budget):
        progress(i / total, desc=f"{method} at {budget}" if method != "none" else "unreduced run")

    budgets = [Budget(fraction=f) for f in fractions]
    rows = bench.sweep(backend, picture, asked.prompt, methods, budgets, n, 1, 0, done, step, floor=True)
    cache = {**{k: v for k, v in cache.items() if k != key}, key: done}
    table = [line + [r["answer"]] for line, r in zip(bench.cells(rows), rows)]
    return bench.figure(rows, column), table, rows, dict(list(cache.items())[-MEMO:])


def percents(text: str) -> list[float]:
    """Budgets typed as percentages, "100, 40, 20", as fractions."""
    try:
        values = [float(part) for part in str(text).replace("%", "").split(",") if part.strip()]
    except ValueError:
        raise ExplorerError(f"budgets are percentages separated by commas, like 100,40,20; got {text!r}") from None
    if not values:
        raise ExplorerError(f"budgets are percentages separated by commas, like 100,40,20; got {text!r}")
    return [check_budget(v) / 100 for v in values]


def sweep_seconds(methods=None, budgets="", column=None, cache=None, **given) -> int:
    cells = 1 + (len(methods or []) + 1) * len(str(budgets).split(","))  # the floor: one more per budget
    return min(600, 10 + cells * (5 + int(given.get("max_new_tokens", 64)) // 10))


def offered(media: str, session: Session):
    """The methods to sweep: those that run on an image, or on a clip of the loaded model."""
    if media != "clip":
        return gr.update(choices=on_images()[1:], value=["cls", "hired", "random"])
    runs = [name for _, name in choices(session.backend() if session.loaded else None) if name != "none"]
    return gr.update(choices=runs, value=["frames", "uniform", "random"])


def wire(session: Session, form: Form, tab: Sweep, clip: Inputs, queue: dict) -> None:
    def swept(methods, budgets, column, cache, progress=gr.Progress(), media="image", **given):
        return sweep(session, methods, budgets, column, cache, progress, media, **given)

    def redraw(column, rows):
        return bench.figure(rows, column) if rows else None

    asked = form.named("image", "prompt", "max_new_tokens", settings=False)
    asked |= dict(media=tab.media, clip=clip.clip, frames=clip.frames)
    inputs = [tab.methods, tab.budgets, tab.column, tab.cache]
    outputs = [tab.plot, tab.rows, tab.measured, tab.cache]
    on_gpu = GPU(swept, duration=sweep_seconds)
    tab.go.click(on_gpu, inputs, outputs, inputs_kwargs=asked, api_name="sweep", **queue)
    tab.column.change(redraw, [tab.column, tab.measured], tab.plot, api_name="replot")
    tab.media.change(lambda media: offered(media, session), tab.media, tab.methods, api_name="sweep_methods")
