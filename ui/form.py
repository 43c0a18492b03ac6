"""The left column: what a run is asked with, each control under the name the API gives it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import gradio as gr

from explorer import METHODS
from explorer.methods import on_images

from .request import setting_name

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = [  # image, prompt
    ("coffee.jpg", "What is on the table?"),
    ("chart.png", "What does this chart show? Read the title and the numbers."),
    ("astronaut.jpg", "Describe everything you can see around the person."),
    ("panorama.jpg", "How many bright galaxies can you see from left to right?"),
    ("rocket.jpg", "What is standing on the launch pad?"),
]


class Form(NamedTuple):
    """The controls of a request, and the buttons that send it."""

    image: gr.Image
    prompt: gr.Textbox
    method: gr.Dropdown
    budget: gr.Slider  # rendered above the picture
    count: gr.Markdown  # the budget in tokens for this image, under it
    max_new_tokens: gr.Slider
    compare: gr.Checkbox
    settings: dict  # API name ("hired_alpha") -> control, one per setting of every method
    go: gr.Button
    stop: gr.Button

    def named(self, *names: str, settings: bool = True) -> dict:
        """The controls `names` and (with `settings`) every method setting's, by API name, for `inputs_kwargs`."""
        return {name: getattr(self, name) for name in names} | (self.settings if settings else {})

    def shown_settings(self, method: str) -> list:
        """Updates that show the settings of `method` and hide the others' (in `settings` order)."""
        mine = {setting_name(method, f.name) for f in dataclasses.fields(METHODS[method])}
        return [gr.update(visible=name in mine) for name in self.settings]

    @property
    def changes(self) -> list:
        """Every change that alters what the method keeps: image, method, budget, a setting."""
        return [self.image.change, self.method.change, self.budget.change, *(c.change for c in self.settings.values())]


def form() -> Form:
    image = gr.Image(
        type="filepath", label="Image (upload, drop or paste; up to 20 MB)", sources=["upload", "clipboard"]
    )
    prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0][1], lines=2)
    method = gr.Dropdown(
        [(f"{name}: {METHODS[name].summary}", name) for name in on_images()], value="hired", label="Method"
    )
    budget = gr.Slider(1, 100, value=20, step=1, label="Budget: % of the visual tokens", render=False)
    count = gr.Markdown(render=False)
    with gr.Accordion("Method settings", open=False):
        settings = {
            setting_name(m, f.name): control(m, f, visible=m == "hired")
            for m, cls in METHODS.items()
            for f in dataclasses.fields(cls)
        }
    with gr.Accordion("Generation", open=False):
        max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
    compare = gr.Checkbox(value=True, label="Compare with the full run (no reduction)")
    with gr.Row():
        go = gr.Button("Run", variant="primary", scale=3)
        stop = gr.Button("Stop", scale=1)
    gr.Examples([[str(ASSETS / f), p] for f, p in EXAMPLES], [image, prompt], label="Examples", elem_id="examples")
    return Form(image, prompt, method, budget, count, max_new_tokens, compare, settings, go, stop)


def control(method: str, f: dataclasses.Field, visible: bool):
    """The input for one method setting, from its dataclass field."""
    common = dict(value=f.default, label=f"{method}: {f.name}", info=f.metadata.get("help"), visible=visible)
    if f.type in ("bool", bool):
        return gr.Checkbox(**common)
    if f.type in ("int", int, "float", float) and "range" in f.metadata:
        low, high = f.metadata["range"]
        return gr.Slider(low, high, step=1 if f.type in ("int", int) else (high - low) / 100, **common)
    if f.type in ("int", int, "float", float):
        return gr.Number(precision=0 if f.type in ("int", int) else None, **common)
    return gr.Textbox(**common)
