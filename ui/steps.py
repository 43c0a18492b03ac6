"""Steps: what the method saw and did, stage by stage, on the last run (each step's picture with its
whole caption under it)."""

from __future__ import annotations

import gradio as gr

from explorer.views import teach, viewer


def build() -> gr.HTML:
    gr.Markdown("What the method saw and did, stage by stage, on the last run.")
    return gr.HTML(css_template=viewer.CARDS_CSS, elem_id="steps")


def cards(shown) -> str:
    return viewer.cards(teach.steps(shown["picture"], shown["result"])) if shown else ""


def wire(running, shown: gr.State, steps: gr.HTML) -> None:
    running.success(cards, shown, steps, api_name="steps")
