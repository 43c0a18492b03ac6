"""Animation: the kept set shrinking as the budget goes from 100% to 5%, with the count on every frame, as
a GIF for slides, drawn from the cached vision pass (no LLM run)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import gradio as gr

from explorer.views import animation

from .form import Form
from .picture import LIVE
from .request import request, shows_errors
from .session import Session, picture


class Animate(NamedTuple):
    frames: gr.Slider
    go: gr.Button
    shown: gr.Image
    file: gr.File


def build() -> Animate:
    gr.Markdown(
        "The kept set shrinking as the budget goes from 100% to 5%, with the count on every frame, for slides. "
        "It is drawn from the cached vision pass: no LLM run."
    )
    with gr.Row():
        frames = gr.Slider(2, 40, value=20, step=1, label="Frames (budgets from 100% down to 5%)")
        go = gr.Button("Make the animation (GIF)")
    shown = gr.Image(type="filepath", label="Budget animation", interactive=False)
    return Animate(frames, go, shown, gr.File(label="Download the GIF"))


@shows_errors
def animate(session: Session, frames: float = 20, **given) -> tuple[str, str]:
    """The GIF (twice: to show and to download) of the kept set at `frames` budgets from 100% down to 5%."""
    asked = request(given)
    budgets = animation.budgets(int(frames))
    drawn = animation.frames(
        session.backend(),
        picture(asked.image),
        asked.method,
        budgets,
        asked.settings,
        session.vision,
        session.key(asked.image),
    )
    folder = Path(tempfile.mkdtemp(prefix="token-drop-animation-"))
    gif = animation.gif(drawn, folder / f"{asked.method}-budget.gif")
    return str(gif), str(gif)


def wire(session: Session, form: Form, tab: Animate) -> None:
    def make(frames: float = 20, **given):
        return animate(session, frames, **given)

    options = {**LIVE, "show_progress": "full", "concurrency_id": "animation", "concurrency_limit": 2}
    asked = form.named("image", "method")
    tab.go.click(
        make, [tab.frames], [tab.shown, tab.file], inputs_kwargs=asked, api_name="animate", preprocess=False, **options
    )
