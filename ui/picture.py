"""The live picture: what the method keeps of the image at the budget, redrawn as the slider moves, with no
LLM run (`explorer.views.preview`), and the count line over it. `/preview` and, after a run that held the
model, `/refresh`."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import gradio as gr

from explorer import ExplorerError
from explorer.views import viewer
from explorer.views.preview import preview

from .form import Form
from .request import NoImage, check, named, request, shows_errors
from .session import Session, picture

VIEWER = {
    part: (Path(__file__).resolve().parent.parent / "assets/viewer" / f"viewer.{part}").read_text()
    for part in ("html", "css", "js")
}
# live events: the last change wins, no spinner over the picture, their own queue (never behind a run)
LIVE = dict(trigger_mode="always_last", show_progress="hidden", concurrency_id="live", concurrency_limit=8)


class Picture(NamedTuple):
    viewer: gr.HTML  # the zoomable picture (assets/viewer): a value per change, the image's scene asked once
    busy: gr.State  # whether the last preview found the model busy with a run


def build(session: Session) -> Picture:
    def scene(key: str) -> dict | None:  # what the page's picture asks for once per image: `server.scene(key)`
        return session.scene(key)

    html = dict(html_template=VIEWER["html"], css_template=VIEWER["css"], js_on_load=VIEWER["js"])
    shown = gr.HTML(None, **html, apply_default_css=False, server_functions=[scene], elem_id="picture")
    return Picture(shown, gr.State(False))


def wire(session: Session, form: Form, tab: Picture, running) -> None:
    """The picture and the count follow every change of image, method, budget or setting (/preview), and,
    after a run, the preview the busy model held up (/refresh)."""

    def live(busy: bool | None = False, request: gr.Request = None, **given):
        asked = session.previews.ask(request.session_hash if request else None)
        shown = live_picture(session, busy, **given)
        return shown if session.previews.newest(asked) else (gr.skip(),) * 3  # a newer one is on its way

    def held_up(busy: bool | None = False, **given):
        return refresh(session, busy, **given)

    asked = dict(inputs=[tab.busy], inputs_kwargs=form.named("image", "method", "budget"), preprocess=False, **LIVE)
    outputs = [tab.viewer, form.count, tab.busy]
    gr.on(form.changes, live, outputs=outputs, api_name="preview", **asked)
    running.then(held_up, outputs=outputs, api_name="refresh", **asked)


@shows_errors
def live_picture(session: Session, busy: bool | None = False, **given) -> tuple:
    """The picture's value (its "text" is the line "K of N visual tokens kept (B%)"; the page asks for the
    image itself once, `Session.scene`), the count line, and whether the model was busy with a run. A
    method or budget out of range is refused; a bad image is said in the count line, not in a pop-up,
    since this runs on every step."""
    try:
        asked = request(given)  # a method or budget out of range is refused first
    except NoImage:
        return None, "Upload an image to see how many visual tokens it makes.", False
    try:
        key, shown = session.key(asked.image), picture(asked.image)
        seen = preview(session.backend(), shown, asked.method, asked.fraction, asked.settings, session.vision, key)
    except ExplorerError as error:
        return gr.skip(), f"⚠️ {named(str(error), given['image'])}", busy
    line = seen.budget.line(asked.method, shown.size)
    value = viewer.value(key, seen.geometry, seen.selection, str(seen.count), seen.note, seen.pending)
    return value, line, seen.busy


@shows_errors
def refresh(session: Session, busy: bool | None, **given) -> tuple:
    """After a run: the preview again, if the last one found the model busy with a run."""
    if busy:
        return live_picture(session, busy, **given)
    check(given)  # nothing to redraw, but a method or budget out of range is refused as everywhere
    return (gr.skip(),) * 3
