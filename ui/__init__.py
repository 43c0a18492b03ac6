"""The app's page: one module per tab or mode, each owning its components and its handlers, around one
`Session` (the model and its caches, `session.py`) and one typed request (`request.py`, from the left
column, `form.py`).

    explore.py    Run: the answers, the numbers, the drift, the pictures of the run, the report
    picture.py    the live picture and the count, following the budget with no LLM run
    steps.py      the method's stages on the last run
    layers.py     any vision layer's attention
    versus.py     two methods on one image
    sweep.py      methods x budgets, measured
    animation.py  the budget animation (GIF)
    accuracy.py   a benchmark's summary.json
    video.py      a video clip in place of the image: its frames, the preview, Run
    video_versus.py  two methods on the clip
"""

from __future__ import annotations

import gradio as gr

from explorer import METHODS

from . import accuracy, animation, explore, form, layers, picture, steps, sweep, versus, video, video_versus
from .session import Session

GPU_QUEUE = dict(concurrency_id="gpu", concurrency_limit=1)  # one model, one request on it at a time
HEADER = (
    "# Token-drop explorer\nSee which visual tokens a reduction method keeps in a high-resolution "
    "vision-language model, and what it saves."
)


def build(session: Session, queue_size: int = 32, eval_dir: str | None = None) -> gr.Blocks:
    """The page around one `Session`: the request on the left; the run's views beside it; the other
    modes, each a click away, under both. `eval_dir`: summaries for the Accuracy tab."""
    with gr.Blocks(title="Token-drop explorer", analytics_enabled=False) as demo:
        gr.Markdown(HEADER)
        status = gr.Markdown("⏳ loading the model…")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):  # on a narrow screen the columns stack, this one first
                asked = form.form()
            with gr.Column(scale=3, min_width=320):
                asked.budget.render()  # right above the picture, also when the columns stack
                asked.count.render()
                with gr.Tab("Kept vs dropped"):
                    shown = picture.build(session)
                views = explore.tabs()
                with gr.Tab("Steps"):
                    cards = steps.build()
                picked = gr.Markdown("Click a patch on a picture to see its partition, cell, score and fate.")
                out = explore.answers(views, shown.viewer)
                downloads = explore.downloads()
        with gr.Tabs(elem_id="modes"):  # the full width: every mode's tab in sight at 1400 px
            with gr.Tab("Layers"):
                inside = layers.build()
            with gr.Tab("Two methods"):
                two = versus.build()
            with gr.Tab("Sweep"):
                swept = sweep.build()
            with gr.Tab("Animation"):
                animated = animation.build()
            with gr.Tab("Accuracy"):
                scored = accuracy.build(eval_dir)
            with gr.Tab("Video", elem_id="video-mode"):
                clip, clipped, clip_files = video.build(session)
                clip_pair = video_versus.build()
        running = explore.wire(session, asked, out, downloads, picked, GPU_QUEUE)
        picture.wire(session, asked, shown, running)
        steps.wire(running, out.shown, cards)
        layers.wire(session, asked, inside, GPU_QUEUE)
        versus.wire(session, asked, two, GPU_QUEUE)
        sweep.wire(session, asked, swept, clip, GPU_QUEUE)
        animation.wire(session, asked, animated)
        accuracy.wire(demo, scored)
        video.wire(session, demo, asked, clip, clipped, clip_files, GPU_QUEUE)
        video_versus.wire(session, demo, asked, clip, clip_pair, GPU_QUEUE)
        wire_model(session, demo, asked, status, out.explanation, [inside.note, two.other, swept.methods])
    return demo.queue(default_concurrency_limit=1, max_size=queue_size)  # a full queue answers "try again"


def wire_model(session: Session, demo: gr.Blocks, asked: form.Form, status, explanation, fitted: list) -> None:
    """The status line, the method pickers holding only the methods that run on the model, and the texts
    that depend on its encoder; the settings shown for the chosen method."""
    note, other, methods = fitted

    def shown_settings(method: str):
        return [*asked.shown_settings(method), session.explain(method)]

    settings = list(asked.settings.values())
    asked.method.change(shown_settings, asked.method, [*settings, explanation], api_name="settings")
    demo.load(session.status, None, status, api_name="status")
    demo.load(lambda: for_model(session), None, [asked.method, other, methods, explanation, note], api_name="for_model")


def for_model(session: Session) -> tuple:
    """The method pickers (Run's, B's, the sweep's) holding only the methods that run on the model, the chosen
    method in words and the Layers note for its encoder; nothing changes when the model cannot be loaded (the
    status says why)."""
    runs = session.runnable()
    if runs is None:
        return (gr.skip(),) * 5
    value = "hired" if "hired" in runs else "cls"
    return (
        gr.update(choices=[(f"{name}: {METHODS[name].summary}", name) for name in runs], value=value),
        gr.update(choices=runs, value="cls"),
        gr.update(choices=runs[1:], value=[m for m in ("cls", "hired", "random") if m in runs]),
        session.explain(value),
        layers.CLS if session.backend().cls_token else layers.RECEIVED,
    )
