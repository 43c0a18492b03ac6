"""Layers: the [CLS] attention of any vision layer (or, without a [CLS] token, the attention each patch
receives), heads summed or one head; click a patch to plot it layer by layer."""

from __future__ import annotations

from typing import NamedTuple

import gradio as gr

from explorer import load_image
from explorer.views import teach
from explorer.views import visual as vis

from .explore import pair
from .form import Form
from .request import request, shows_errors
from .session import GPU, Session

CLS = (
    "The [CLS] token's attention to every patch, in any layer of the vision encoder, heads summed or one head. "
    "Click a patch to see its attention layer by layer."
)
RECEIVED = (
    "This model's vision encoder has no [CLS] token: shown instead is the attention each patch receives "
    "(averaged over the patches attending to it and over the patches a token folds), in any layer, heads summed "
    "or one head. Click a patch to see it layer by layer."
)
ALL = "all heads, summed"


class Layers(NamedTuple):
    note: gr.Markdown
    go: gr.Button
    layer: gr.Slider
    head: gr.Dropdown
    views: list  # thumbnail, crops
    profile: gr.Plot
    profiled: gr.Markdown
    read: gr.State


def build() -> Layers:
    note = gr.Markdown(CLS)
    with gr.Row():
        go = gr.Button("Read every layer of this image")
        layer = gr.Slider(0, 1, value=0, step=1, label="Vision layer")
        head = gr.Dropdown([ALL], value=ALL, label="Heads")
    views = pair("thumbnail", "crops")
    with gr.Row():
        profile = gr.Plot(label="The clicked patch, layer by layer")
        profiled = gr.Markdown()
    return Layers(note, go, layer, head, views, profile, profiled, gr.State())


@shows_errors
def read(session: Session, **given) -> tuple:
    """The [CLS] attention of every vision layer and head on this image (one encoder pass), and the
    last layer's pictures."""
    asked = request(given)
    picture = load_image(asked.image)
    geometry, maps = teach.layer_maps(session.backend(), picture, asked.prompt or "Describe the image.")
    heads = [ALL] + [f"head {h}" for h in range(maps.shape[2])]
    done = {"picture": picture, "geometry": geometry, "maps": maps}
    layer = gr.update(maximum=len(maps) - 1, value=len(maps) - 1)
    return done, layer, gr.update(choices=heads, value=heads[0]), *layer_pictures(done, len(maps) - 1, heads[0])


def layer_pictures(done, layer: int, head: str) -> list:
    """Heatmaps of one layer's attention, one per view."""
    if not done:
        return [gr.skip(), gr.skip()]
    g, h = done["geometry"], None if head.startswith("all") else int(head.split()[-1])
    out = [
        gr.update(
            value=teach.layer_picture(done["picture"], g, done["maps"], int(layer), h, tokens),
            label=f"{name}: layer {int(layer)}, {head}",
        )
        for name, tokens in list(vis.views(g).items())[:2]
    ]
    return out + [gr.update(value=None)] * (2 - len(out))


def layer_profile(done, view: int, head: str, x: float, y: float):
    """A plot of the clicked token's attention in every layer, and a line on the token."""
    if not done:
        return None, "Read the layers first."
    g = done["geometry"]
    tokens = list(vis.views(g).values())
    token = vis.token_at(g, tokens[view], x, y) if view < len(tokens) else None
    if token is None:
        return None, "No visual token there."
    h = None if head.startswith("all") else int(head.split()[-1])
    row, col = g.cells[token].tolist()
    text = f"token {token}: {g.names[g.partition[token]]}, cell (row {row}, col {col})"
    return teach.profile(done["maps"], token, h, head), text


def wire(session: Session, form: Form, tab: Layers, queue: dict) -> None:
    def layers(**given):
        return read(session, **given)

    outputs = [tab.read, tab.layer, tab.head, *tab.views]
    asked = form.named("image", "prompt", settings=False)
    tab.go.click(
        GPU(layers, duration=60), None, outputs, inputs_kwargs=asked, api_name="layers", preprocess=False, **queue
    )
    for control in (tab.layer, tab.head):
        control.change(layer_pictures, [tab.read, tab.layer, tab.head], tab.views, api_name="layer")
    for i, shown in enumerate(tab.views):
        shown.select(on_profile(i), [tab.read, tab.head], [tab.profile, tab.profiled], api_name=f"profile_{i}")


def on_profile(view: int):
    def clicked(done, head, evt: gr.SelectData):
        return layer_profile(done, view, head, *evt.index)

    return clicked
