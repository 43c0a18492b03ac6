"""One typed request: what a visitor asks with (the image, the prompt, the method, the budget in percent and
that method's settings), gathered from the page by name and checked in one place.

Every control of the page's left column has the name the API shows (`image`, `prompt`, `method`,
`budget`, `max_new_tokens`, `compare`, and one per method setting, `hired_alpha`, ...): an event takes
them as keyword arguments (`Form.named`), and `Form.request` turns them into a `Request` or refuses
them with one clear message. The settings' controls are built from each method's dataclass, so a new
setting needs no edit here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from explorer import METHODS, ExplorerError
from explorer.engine.pipeline import check_request


def setting_name(method: str, name: str) -> str:
    """The API's name of a method's setting: hired_alpha, prumerge_plus_adaptive, tome_vit_..."""
    return f"{method}_{name}".replace("+", "_plus").replace("-", "_")


@dataclass(frozen=True)
class Request:
    """What one event asks: the budget in percent, as the page shows it (`fraction` for the library)."""

    image: str  # the file on the server (`named` words a message with the visitor's name for it)
    method: str = "none"
    budget: float = 100.0
    settings: dict = field(default_factory=dict)  # the method's settings by name, typed
    prompt: str = ""
    max_new_tokens: int = 64
    compare: bool = True

    @property
    def fraction(self) -> float:
        return self.budget / 100


def check_method(method) -> str:
    if method not in METHODS:
        raise ExplorerError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def check_budget(budget) -> float:
    """A budget in percent, as a float in (0, 100]."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ExplorerError(f"the budget is a percentage of the visual tokens, a number; got {budget!r}") from None
    if not 0 < value <= 100:  # also refuses NaN
        raise ExplorerError(f"the budget is a percentage of the visual tokens in (0, 100], got {value:g}%")
    return value


def settings_of(method: str, given: dict) -> dict:
    """The settings of `method` among the named values of every method's controls, typed (sliders send
    floats); a setting not given keeps its default."""
    fields = dataclasses.fields(METHODS[method])
    return {
        f.name: _typed(f, given[setting_name(method, f.name)]) for f in fields if setting_name(method, f.name) in given
    }


def _typed(f: dataclasses.Field, value):
    return int(value) if f.type in ("int", int) and value is not None else value


def path_of(image) -> str:
    """The file behind an image input: a path, or the upload record Gradio hands over unprocessed."""
    return image if isinstance(image, str) else image["path"]


def named(message: str, image) -> str:
    """The message with the server's path of the image replaced by the file's own name."""
    if not image:
        return message
    name = image.get("orig_name") if isinstance(image, dict) else None
    return message.replace(path_of(image), name or Path(path_of(image)).name)


IMAGE_BYTES = 20_000_000  # the largest image taken; the server's upload limit is a video's (app.UPLOAD_LIMIT)


def check_size(path: str, limit: int) -> None:
    """Refuse a file over `limit` bytes, before anything decodes it."""
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if size > limit:
        raise ExplorerError(f"{path} is too large: {size / 1e6:.0f} MB, the limit for it is {limit / 1e6:.0f} MB")


class NoImage(ExplorerError):
    """The request has no image."""


def check(given: dict) -> tuple[str, float]:
    """The method and the budget (percent) of the named values: a known method, a budget in (0, 100]."""
    return check_method(given.get("method", "none")), check_budget(given.get("budget", 100))


def request(given: dict, prompt: bool = False, limit: int | None = None) -> Request:
    """The request the named values make, checked: a known method, a budget in (0, 100] percent, an image
    (`NoImage`) of at most `limit` bytes (default `IMAGE_BYTES`; the server takes uploads up to a video's
    limit), and with `prompt` a prompt and answer length the model takes."""
    method, budget = check(given)
    image = given.get("image")
    if not image:
        raise NoImage("upload an image first, or pick an example")
    check_size(path_of(image), IMAGE_BYTES if limit is None else limit)
    asked = Request(
        image=path_of(image),
        method=method,
        budget=budget,
        settings=settings_of(method, given),
        prompt=given.get("prompt") or "",
        max_new_tokens=int(given.get("max_new_tokens", 64)),
        compare=bool(given.get("compare", True)),
    )
    if prompt:
        check_request(asked.prompt, asked.max_new_tokens)
    return asked


def shows_errors(function):
    """A handler whose `ExplorerError` reaches the page as one message that names the visitor's file, not
    the server's copy of it (the image is the `image` keyword, or the first argument)."""

    def image_of(args, kwargs):
        return kwargs.get("image", args[0] if args and isinstance(args[0], (str, dict)) else None)

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def streaming(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except ExplorerError as error:
                raise gr.Error(named(str(error), image_of(args, kwargs))) from None

        return streaming

    @functools.wraps(function)
    def answering(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ExplorerError as error:
            raise gr.Error(named(str(error), image_of(args, kwargs))) from None

    return answering
