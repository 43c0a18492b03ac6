"""Two methods: the method on the left (A, with its settings) against another (B, its defaults) at the same
budget: where they agree on the image, their numbers side by side, and their answers."""

from __future__ import annotations

from typing import NamedTuple

import gradio as gr

from explorer import load_image, run
from explorer.methods import on_images
from explorer.views import visual as vis

from .explore import gpu_seconds, pair
from .form import Form
from .request import check_method, request, shows_errors
from .session import GPU, Session


class Versus(NamedTuple):
    other: gr.Dropdown
    go: gr.Button
    views: list  # thumbnail, crops
    answer_a: gr.Textbox
    answer_b: gr.Textbox
    table: gr.Dataframe


def build() -> Versus:
    gr.Markdown(
        "The method picked on the left (A) against another (B) at the same budget. Kept by both: "
        "untouched; only by A: blue; only by B: orange; by neither: greyed and darkened."
    )
    with gr.Row():
        other = gr.Dropdown(on_images(), value="cls", label="Method B (default settings)")
        go = gr.Button("Compare")
    views = pair("thumbnail", "crops")
    return Versus(other, go, views, *answers())


def answers() -> tuple[gr.Textbox, gr.Textbox, gr.Dataframe]:
    """A's and B's answers side by side, then their numbers (this tab's and the Video tab's pair)."""
    with gr.Row():
        answer_a = gr.Textbox(label="Answer A", lines=3, interactive=False)
        answer_b = gr.Textbox(label="Answer B", lines=3, interactive=False)
    return answer_a, answer_b, gr.Dataframe(headers=["", "A", "B", "A / B"], interactive=False, wrap=True)


@shows_errors
def versus(session: Session, other: str = "cls", **given) -> tuple:
    """A and B at the same budget: two pictures of where they agree, their answers and their numbers."""
    asked, other = request(given, prompt=True), check_method(other)
    picture, backend = load_image(asked.image), session.backend()
    n = asked.max_new_tokens
    a = run(backend, picture, asked.prompt, asked.method, asked.fraction, settings=asked.settings, max_new_tokens=n)
    b = run(backend, picture, asked.prompt, other, asked.fraction, max_new_tokens=n)
    out = []
    for name, tokens in list(vis.views(a.geometry).items())[:2]:
        drawn, counts = vis.agreement(picture, a.geometry, a.selection.keep, b.selection.keep, tokens)
        label = f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        out.append(gr.update(value=drawn, label=label, visible=True))
    out += [gr.update(value=None, visible=False)] * (2 - len(out))
    return *out, a.answer, b.answer, vis.metrics(a, b)


def wire(session: Session, form: Form, tab: Versus, queue: dict) -> None:
    def compared(other: str = "cls", **given):
        return versus(session, other, **given)

    outputs = [*tab.views, tab.answer_a, tab.answer_b, tab.table]
    asked = form.named("image", "prompt", "method", "budget", "max_new_tokens")
    on_gpu = GPU(compared, duration=gpu_seconds)
    tab.go.click(on_gpu, [tab.other], outputs, inputs_kwargs=asked, api_name="versus", preprocess=False, **queue)
