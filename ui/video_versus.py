"""Two methods on a clip: the Video tab's method (A, with its settings) against another (B, its defaults) at the
same budget, frame by frame where they agree, their answers and their numbers (`/video_versus`)."""

from __future__ import annotations

from typing import NamedTuple

import gradio as gr

from explorer import run
from explorer.views import clip as clips
from explorer.views import visual as vis

from .form import Form
from .request import check_method, shows_errors
from .session import GPU, Session, video
from .versus import answers
from .video import Inputs, asked_clip, choices, frame_default, gpu_seconds


class VideoVersus(NamedTuple):
    other: gr.Dropdown
    go: gr.Button
    strip: gr.HTML
    answer_a: gr.Textbox
    answer_b: gr.Textbox
    table: gr.Dataframe


def build() -> VideoVersus:
    with gr.Accordion("Two methods on the clip", open=False):
        gr.Markdown(
            "The method above (A) against another (B) at the same budget, on every frame. Kept by both: "
            "untouched; only by A: blue; only by B: orange; by neither: greyed and darkened."
        )
        with gr.Row():
            other = gr.Dropdown(choices(None), value="uniform", label="Method B (default settings)", scale=3)
            go = gr.Button("Compare on the clip", scale=1)
        strip = gr.HTML(elem_id="clip-versus")
        return VideoVersus(other, go, strip, *answers())


@shows_errors
def versus(session: Session, other: str = "uniform", image=None, **given) -> tuple:
    """A and B on the clip at the same budget: the strip of where they agree, their answers and their numbers."""
    asked, frames = asked_clip({**given, "clip": image}, frame_default(session), prompt=True)
    other, n = check_method(other), asked.max_new_tokens
    clip, backend = video(asked.image, frames), session.backend()
    a = run(backend, clip, asked.prompt, asked.method, asked.fraction, settings=asked.settings, max_new_tokens=n)
    b = run(backend, clip, asked.prompt, other, asked.fraction, max_new_tokens=n)
    strip = clips.agreement_strip(clip, a.geometry, a.selection.keep, b.selection.keep)
    return strip, a.answer, b.answer, vis.metrics(a, b)


def for_model(session: Session):
    """B's picker holding the methods that run on a clip of the loaded model; unchanged when it cannot load."""
    if session.runnable() is None:
        return gr.skip()
    return gr.update(choices=choices(session.backend()), value="uniform")


def wire(session: Session, demo: gr.Blocks, form: Form, asked: Inputs, tab: VideoVersus, queue: dict) -> None:
    def compared(other: str = "uniform", clip=None, **given):
        return versus(session, other, image=clip, **given)

    named_in = dict(clip=asked.clip, frames=asked.frames, prompt=asked.prompt, method=asked.method)
    named_in |= dict(budget=asked.budget, max_new_tokens=form.max_new_tokens) | form.settings | asked.settings
    on_gpu = GPU(compared, duration=gpu_seconds)
    outputs = [tab.strip, tab.answer_a, tab.answer_b, tab.table]
    tab.go.click(on_gpu, [tab.other], outputs, inputs_kwargs=named_in, api_name="video_versus", preprocess=False,
                 **queue)  # fmt: skip
    demo.load(lambda: for_model(session), None, tab.other, api_name="video_versus_methods")
