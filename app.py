"""The token-drop explorer app: upload an image, pick a method and a budget, see what was kept and
what it saved, reduced and full side by side.

    python app.py [--model HUB_ID_OR_FOLDER] [--device cpu|cuda] [--host 0.0.0.0] [--port 7860]
"""

from __future__ import annotations

try:  # Hugging Face ZeroGPU; imported before anything touches CUDA, and a no-op when not on ZeroGPU
    from spaces import GPU
except ImportError:

    def GPU(task=None, **options):
        return task if task is not None else lambda task: task


import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import torch
from PIL import Image

import backends
from explorer import METHODS, Budget, ExplorerError, load_image, make, run, stream
from explorer.core import fraction_of
from explorer.engine import fidelity
from explorer.engine.llm import least_mean
from explorer.engine.pipeline import check_request
from explorer.evaluation import accuracy, bench
from explorer.methods import unavailable
from explorer.views import animation, report, teach
from explorer.views import viewer as draw
from explorer.views import visual as vis
from explorer.views.preview import VisionCache, preview, vision_pass

ASSETS = Path(__file__).parent / "assets"
EXAMPLES = [  # image, prompt
    ("coffee.jpg", "What is on the table?"),
    ("chart.png", "What does this chart show? Read the title and the numbers."),
    ("astronaut.jpg", "Describe everything you can see around the person."),
    ("panorama.jpg", "How many bright galaxies can you see from left to right?"),
    ("rocket.jpg", "What is standing on the launch pad?"),
]
UPLOAD_LIMIT = "20mb"  # refused by the server before anything is decoded
CSS = "#examples th { white-space: normal; }"  # the examples' headers wrap, so the table fits a phone
MEMO = 2  # full runs kept per visitor (each with its (T, V) log-probabilities)
SETTINGS = [(name, f) for name, cls in METHODS.items() for f in dataclasses.fields(cls)]  # every method's settings
TABLE = ["", "reduced", "full", "reduced / full"]
LAYERS_CLS = (
    "The [CLS] token's attention to every patch, in any layer of the vision encoder, heads summed or one head. "
    "Click a patch to see its attention layer by layer."
)
LAYERS_RECEIVED = (
    "This model's vision encoder has no [CLS] token: shown instead is the attention each patch receives "
    "(averaged over the patches attending to it and over the patches a token folds), in any layer, heads summed "
    "or one head. Click a patch to see it layer by layer."
)
SWEEP = [*bench.HEAD, "answer"]
VIEWER = {part: (ASSETS / "viewer" / f"viewer.{part}").read_text() for part in ("html", "css", "js")}


def handler(function):
    """What every handler of a user's request shares: a handler that takes `max_new_tokens` gets its prompt
    and length checked, one that takes an `image` is refused without one, and an `ExplorerError` reaches
    the page as one message that names the user's file, not the server's copy of it."""
    signature = inspect.signature(function)

    def checked(args, kwargs) -> None:
        given = signature.bind(*args, **kwargs).arguments
        if "max_new_tokens" in given:
            check_request(given["prompt"], int(given["max_new_tokens"]))
        if "image" in given and not given["image"]:
            raise ExplorerError("upload an image first, or pick an example")

    def image_of(args, kwargs):
        return signature.bind(*args, **kwargs).arguments.get("image")

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def streaming(*args, **kwargs):
            try:
                checked(args, kwargs)
                yield from function(*args, **kwargs)
            except ExplorerError as error:
                raise gr.Error(_named(str(error), image_of(args, kwargs))) from None

        return streaming

    @functools.wraps(function)
    def answering(*args, **kwargs):
        try:
            checked(args, kwargs)
            return function(*args, **kwargs)
        except ExplorerError as error:
            raise gr.Error(_named(str(error), image_of(args, kwargs))) from None

    return answering


class Explorer:
    """What the app serves: one model, loaded on first use and shared by every visitor."""

    def __init__(self, model: str, device: str | None = None, warm_up: bool = True, notice: str = ""):
        self.model, self.device, self.warm_up = model, device, warm_up
        self.notice = notice  # why this model and not the one the operator would expect (`backends.choose`)
        self._lock = threading.Lock()
        self._backend = None
        self._paths: dict[str, str] = {}  # image key -> its file, for the last images previewed
        self._sizes: dict[tuple[int, int], int] = {}  # (width, height) -> visual tokens

        # the preview's vision passes; on ZeroGPU each runs in a GPU worker and hands its signals back on the
        # CPU (the worker's memory is gone after the call): only the picture and the signal names travel
        @functools.partial(GPU, duration=30)
        def on_gpu(picture, needs):
            return vision_pass(self.backend(), picture, needs).cpu()

        def in_a_worker(backend, picture, needs, wait_s):
            return on_gpu(picture, needs) if needs else vision_pass(backend, picture, needs)  # geometry: no GPU

        zero = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
        self.cache = VisionCache(compute=in_a_worker if zero else vision_pass)

    def backend(self):
        with self._lock:
            if self._backend is None:
                backend = backends.load(self.model, self.device)
                if self.warm_up:  # one short unmeasured run, so the first visitor's numbers are not a cold start
                    run(backend, Image.new("RGB", (336, 336), "gray"), "Hello", "none", max_new_tokens=2)
                self._backend = backend
            return self._backend

    def status(self) -> str:
        """A line on the model, loading it first if needed."""
        try:
            b = self.backend()
        except ExplorerError as error:
            return f"⚠️ **{self.model} could not be loaded.** {error}"
        note = " · **random weights**: answers are gibberish; token counts, overlays and costs are real"
        line = f"**Model**: {b.name} ({b.family}) on {b.device}" + (note if b.random_weights else "")
        line += f"\n\n⚠️ {self.notice}" if self.notice else ""
        reasons = [reason for name in METHODS if (reason := unavailable(name, b))]
        return line + "".join(f"\n- not on this model: {reason}" for reason in reasons)

    def explain(self, method: str) -> str:
        """The method in plain words, for the loaded model's vision encoder (with or without [CLS])."""
        return vis.explain(method, None if self._backend is None else self._backend.cls_token)

    def for_model(self):
        """The method pickers holding only the methods that run on the model, and the texts that depend
        on its encoder; nothing changes when the model cannot be loaded (the status says why)."""
        try:
            b = self.backend()
        except ExplorerError:
            return (gr.skip(),) * 5
        runs = [name for name in METHODS if not unavailable(name, b)]
        value = "hired" if "hired" in runs else "cls"
        return (
            gr.update(choices=[(f"{name}: {METHODS[name].summary}", name) for name in runs], value=value),
            gr.update(choices=runs, value="cls"),
            gr.update(choices=runs[1:], value=[m for m in ("cls", "hired", "random") if m in runs]),
            self.explain(value),
            LAYERS_CLS if b.cls_token else LAYERS_RECEIVED,
        )

    def count(self, image, method: str, budget: float, *settings) -> str:
        """What the budget slider means for this image, in tokens (`settings`: every method's controls,
        as `explore` takes them; an adaptive method picks its own count)."""
        if not image:
            return "Upload an image to see how many visual tokens it makes."
        try:
            width, height = _size(_path(image))
            n = self._tokens(width, height)
        except ExplorerError as error:
            return f"⚠️ {_named(str(error), image)}"
        if not METHODS[method].budgeted:
            return f"All **{n}** visual tokens of this {width}x{height} image reach the LLM."
        chosen = _chosen(method, settings)
        if chosen.get("adaptive"):
            return f"Adaptive: {method} picks its own count of this {width}x{height} image's {n} visual tokens."
        kept = max(1, fraction_of(budget / 100, n))
        if METHODS[method].stage == "vision":
            return f"**{kept}** of {n} visual tokens ({budget:g}%) reach the LLM for this {width}x{height} image."
        if chosen.get("budget_after_cuts"):
            return f"**{kept}** of {n} visual tokens ({budget:g}%) remain after the last cut for this {width}x{height} image."
        said = (
            f"**{kept}** of {n} visual tokens ({budget:g}%) per LLM layer on average for this {width}x{height} "
            f"image: the layers before {method}'s first cut see all {n}, later ones fewer."
        )
        try:
            least = least_mean(make(method, **chosen), self.backend().depth, n)
        except ExplorerError as error:
            return f"{said} ⚠️ {error}"
        return said if kept >= least else f"{said} ⚠️ {method} cannot go below {least:.0f} on average here."

    def preview(self, image, method: str, budget: float, busy: bool | None, *settings):
        """The live picture: what `method` keeps of the image at `budget` (%), from the cached vision pass
        and without any LLM run (`explorer.views.preview`). Returns the picture's value (its "text" is the line
        "K of N visual tokens kept"; the page asks for the image itself once, `scene`), the count, and
        whether the model was busy with a run (`busy` is the last preview's). A bad input is said in the
        count, not in a pop-up, since this runs on every step."""
        count = self.count(image, method, budget, *settings)
        if not image:
            return None, count, False
        try:
            path = _path(image)
            key = self._key(path)
            shown = preview(
                self.backend(), _picture(path), method, budget / 100, _chosen(method, settings), self.cache, key
            )
        except ExplorerError as error:
            return gr.skip(), f"{count}\n\n⚠️ {_named(str(error), image)}", busy
        value = draw.value(key, shown.geometry, shown.selection, shown.line, shown.note, shown.pending)
        return value, count, shown.busy

    def scene(self, key: str) -> dict | None:
        """The image `key` names and where its visual tokens sit, for the page's picture (None when the
        key is not one of the last images previewed)."""
        path = self._paths.get(key)
        if path is None:
            return None
        picture = _picture(path)
        seen, _ = self.cache.get(self.backend(), picture, (), key)  # the geometry: no model work
        return draw.scene(picture, seen.geometry, key)

    def refresh(self, image, method: str, budget: float, busy: bool | None, *settings):
        """After a run: the preview again, if the last one found the model busy with a run."""
        if not busy:
            return (gr.skip(),) * 3
        return self.preview(image, method, budget, busy, *settings)

    def _tokens(self, width: int, height: int) -> int:
        """The visual tokens of an image this size (its geometry takes tens of ms: asked once per size)."""
        if (width, height) not in self._sizes:
            self._sizes[(width, height)] = len(self.backend().layout([height, width])[0])
        return self._sizes[(width, height)]

    def _key(self, path: str) -> str:
        """Names an image for this model (its cached vision passes, the page's scene), and remembers its file."""
        key = f"{self.model} {_digest(path)}"
        self._paths[key] = path
        while len(self._paths) > 64:
            self._paths.pop(next(iter(self._paths)))
        return key

    @handler
    def animate(self, image, method: str, frames: float, *settings) -> tuple[str, str]:
        """The budget animation: the kept set from 100% down to 5% in `frames` frames, as a GIF (twice: to
        show and to download), from the cached vision pass."""
        path = _path(image)
        budgets = animation.budgets(int(frames))
        chosen = _chosen(method, settings)
        pictures = animation.frames(
            self.backend(), _picture(path), method, budgets, chosen, self.cache, self._key(path)
        )
        gif = animation.gif(pictures, Path(tempfile.mkdtemp(prefix="token-drop-animation-")) / f"{method}-budget.gif")
        return str(gif), str(gif)

    @handler
    def explore(self, image, prompt, method, budget, compare, max_new_tokens, memo, *settings):
        """Run the method, then the full model unless it ran on this image and prompt before; yields
        {output name: value} as things change (the names are OUTPUTS)."""
        path = _path(image)
        picture = load_image(path)
        chosen = _chosen(method, settings)
        n = int(max_new_tokens)
        key = (_digest(path), prompt, n)
        full, full_lp = memo.get(key, (None, None)) if compare else (None, None)
        loading = "loading the model (once)… " if self._backend is None else ""
        yield {"answer": "", "full_answer": full.answer if full else "", "live": f"{loading}running the method…"}
        backend = self.backend()

        last = 0.0
        for r in stream(backend, picture, prompt, method, budget / 100, chosen, n):
            if r.done or time.monotonic() - last > 0.1:  # light updates: drawing now would slow the run
                last = time.monotonic()
                yield {"answer": r.answer, "table": vis.metrics(r, full), "live": _speed("reduced", r)}
        reduced = r
        pics, looks = pictures(picture, reduced)
        pics["viewer"] = last_run(self._key(path), reduced)
        shown = {"picture": picture, "result": reduced, "full": None, "drift": None}
        yield {**restyled(pics, looks), "explanation": self.explain(method), "shown": shown}
        drift, strip = None, ""
        if compare:
            if full is None:
                for full in stream(backend, picture, prompt, "none", 1.0, max_new_tokens=n):
                    if full.done or time.monotonic() - last > 0.1:
                        last = time.monotonic()
                        table = vis.metrics(reduced, full)
                        yield {"full_answer": full.answer, "table": table, "live": _speed("full", full)}
                full_lp = fidelity.logprobs(backend, picture, prompt, full.answer_ids)
                memo = dict(list({**memo, key: (full, full_lp)}.items())[-MEMO:])
            # the full answer scored under the reduced model: one more forward pass, not timed
            mine = fidelity.logprobs(backend, picture, prompt, full.answer_ids, method, budget / 100, chosen)
            drift = fidelity.drift(mine, full_lp, full.answer_ids)
            strip = vis.strip([backend.tokenizer.decode([t]) for t in full.answer_ids], drift)
        yield {  # everything, so an API call's result is complete
            **pics,
            "answer": reduced.answer,
            "full_answer": full.answer if full else "",
            "strip": strip,
            "table": vis.metrics(reduced, full, drift),
            "live": _speed("reduced", reduced) + (f" · {_speed('full', full)}" if full else ""),
            "explanation": self.explain(method),
            "shown": {**shown, "full": full, "drift": drift},
            "memo": memo,
        }

    @handler
    def sweep(self, image, prompt, methods, budgets, max_new_tokens, column, cache, progress=gr.Progress()):
        """Every chosen method at every budget on this image and prompt (one run each, fixed answer
        length), measured against the unreduced run and the floor (`uniform` keeping as many tokens,
        no selection work); cells run before for the same image, prompt and
        length are reused. Returns the chart, the table, the rows and the cache."""
        if not methods:
            raise ExplorerError("pick at least one method to sweep")
        fractions = _percents(budgets)
        picture, n = load_image(_path(image)), int(max_new_tokens)
        key = (_digest(_path(image)), prompt, n)
        done = dict(cache.get(key, {}))
        progress(0, desc="loading the model" if self._backend is None else "starting")
        backend = self.backend()

        def step(i, total, method, budget):
            progress(i / total, desc=f"{method} at {budget}" if method != "none" else "unreduced run")

        budgets = [Budget(fraction=f) for f in fractions]
        rows = bench.sweep(backend, picture, prompt, methods, budgets, n, 1, 0, done, step, floor=True)
        cache = {**{k: v for k, v in cache.items() if k != key}, key: done}
        table = [line + [r["answer"]] for line, r in zip(bench.cells(rows), rows)]
        return bench.figure(rows, column), table, rows, dict(list(cache.items())[-MEMO:])

    @handler
    def versus(self, image, prompt, method, other, budget, max_new_tokens, *settings):
        """The chosen method (A, with its settings) and another (B, its defaults) at the same budget:
        where they agree on the image, their numbers side by side, and their answers."""
        picture, n = load_image(_path(image)), int(max_new_tokens)
        chosen = _chosen(method, settings)
        backend = self.backend()
        a = run(backend, picture, prompt, method, budget / 100, settings=chosen, max_new_tokens=n)
        b = run(backend, picture, prompt, other, budget / 100, max_new_tokens=n)
        out = []
        for name, tokens in list(vis.views(a.geometry).items())[:2]:
            drawn, counts = vis.agreement(picture, a.geometry, a.selection.keep, b.selection.keep, tokens)
            label = f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            out.append(gr.update(value=drawn, label=label, visible=True))
        out += [gr.update(value=None, visible=False)] * (2 - len(out))
        return *out, a.answer, b.answer, vis.metrics(a, b)

    @handler
    def layers(self, image, prompt):
        """The [CLS] attention of every vision layer and head on this image (one encoder pass)."""
        picture = load_image(_path(image))
        geometry, maps = teach.layer_maps(self.backend(), picture, prompt or "Describe the image.")
        heads = ["all heads, summed"] + [f"head {h}" for h in range(maps.shape[2])]
        read = {"picture": picture, "geometry": geometry, "maps": maps}
        layer = gr.update(maximum=len(maps) - 1, value=len(maps) - 1)
        return read, layer, gr.update(choices=heads, value=heads[0]), *layer_pictures(read, len(maps) - 1, heads[0])

    @staticmethod
    def click(view: int, shown, x: float, y: float) -> str:
        """What the patch at displayed pixel (x, y) of picture `view` is: partition, cell, score, fate."""
        if not shown:
            return "Run first, then click a patch."
        r = shown["result"]
        views = list(vis.views(r.geometry).values())
        token = vis.token_at(r.geometry, views[view], x, y) if view < len(views) else None
        return "No visual token there." if token is None else vis.describe(r.geometry, r.selection, token)

    @staticmethod
    def report(shown) -> list[str]:
        """The shown run as a self-contained HTML page and its JSON, in a new temporary folder."""
        if not shown:
            raise gr.Error("run first, then download its report")
        folder = Path(tempfile.mkdtemp(prefix="token-drop-report-"))
        name = f"{shown['result'].method}-{shown['result'].tokens['visual_kept']}"
        page = folder / f"{name}.html"
        page.write_text(report.page(shown["picture"], shown["result"], shown["full"], shown["drift"]))
        data = folder / f"{name}.json"
        data.write_text(json.dumps(report.data(shown["result"], shown["full"], shown["drift"]), indent=2))
        return [str(page), str(data)]

    @staticmethod
    def remap(which: str, shown) -> dict:
        """The heatmaps redrawn with another of the run's maps."""
        return restyled(*pictures(shown["picture"], shown["result"], which, heat_only=True)) if shown else {}


def pictures(picture, r, which: str = "scores", heat_only: bool = False) -> tuple[dict, dict]:
    """The overlay and the heatmap of each view of a run's geometry (None for a view that is not
    there), and each picture's label and visibility."""
    g, selection = r.geometry, r.selection
    views = list(vis.views(g).items())
    maps = {"scores": selection.scores, **selection.maps}
    values, looks = {}, {}
    if not heat_only:
        values |= {"map_choice": which, "plot": vis.budget_figure(r)}
        looks["map_choice"] = {"choices": list(maps)}
    for i in range(2):
        name, tokens = views[i] if i < len(views) else ("", None)
        values[f"heat_{i}"] = None
        shows = maps.get(which)
        if tokens is not None and shows is not None and not shows[tokens].isnan().all():
            values[f"heat_{i}"] = vis.heatmap(picture, g, maps[which], tokens)
        looks[f"heat_{i}"] = {"label": f"{name}: {which} (click a patch)", "visible": tokens is not None}
        if not heat_only:
            values[f"overlay_{i}"] = None if tokens is None else vis.overlay(picture, g, selection, tokens)
            kept = 0 if tokens is None else int(torch.isin(tokens, selection.keep.cpu()).sum())
            label = f"{name}: {kept} of {len(tokens) if tokens is not None else 0} kept (click a patch)"
            looks[f"overlay_{i}"] = {"label": label, "visible": tokens is not None}
    return values, looks


def last_run(key: str, r) -> dict:
    """The live picture's value for a run's choice: what reached the LLM (after the last cut, inside it)."""
    t = r.tokens
    where = "after its last cut inside the LLM" if t["llm_cuts"] else "what reached the LLM"
    line = f"{t['visual_kept']} of {t['visual_full']} visual tokens kept (the last run)"
    return draw.value(key, r.geometry, r.selection, line, f"The last run's choice: {where}; move the budget to preview")


def restyled(values: dict, looks: dict) -> dict:
    """Values as updates that also set each component's label, visibility or choices."""
    return {name: gr.update(value=value, **looks.get(name, {})) for name, value in values.items()}


def layer_pictures(read, layer: int, head: str) -> list:
    """Heatmaps of one layer's [CLS] attention, one per view."""
    if not read:
        return [gr.skip(), gr.skip()]
    g, h = read["geometry"], None if head.startswith("all") else int(head.split()[-1])
    out = [
        gr.update(
            value=teach.layer_picture(read["picture"], g, read["maps"], int(layer), h, tokens),
            label=f"{name}: layer {int(layer)}, {head}",
        )
        for name, tokens in list(vis.views(g).items())[:2]
    ]
    return out + [gr.update(value=None)] * (2 - len(out))


def layer_profile(read, view: int, head: str, x: float, y: float):
    """A plot of the clicked token's [CLS] attention in every layer, and a line on the token."""
    if not read:
        return None, "Read the layers first."
    g = read["geometry"]
    tokens = list(vis.views(g).values())
    token = vis.token_at(g, tokens[view], x, y) if view < len(tokens) else None
    if token is None:
        return None, "No visual token there."
    h = None if head.startswith("all") else int(head.split()[-1])
    row, col = g.cells[token].tolist()
    text = f"token {token}: {g.names[g.partition[token]]}, cell (row {row}, col {col})"
    return teach.profile(read["maps"], token, h, head), text


def _percents(text: str) -> list[float]:
    """Budgets typed as percentages, "100, 40, 20", as fractions."""
    try:
        values = [float(part) for part in str(text).replace("%", "").split(",") if part.strip()]
    except ValueError:
        raise ExplorerError(f"budgets are percentages separated by commas, like 100,40,20; got {text!r}") from None
    if not values or not all(0 < v <= 100 for v in values):
        raise ExplorerError(f"every budget must be a percentage in (0, 100], got {text!r}")
    return [v / 100 for v in values]


def _path(image) -> str:
    """The file behind an image input: a path, or the upload record Gradio hands over unprocessed."""
    return image if isinstance(image, str) else image["path"]


def _named(message: str, image) -> str:
    """The message with the server's path of the image replaced by the file's own name."""
    if not image:
        return message
    name = image.get("orig_name") if isinstance(image, dict) else None
    return message.replace(_path(image), name or Path(_path(image)).name)


@functools.lru_cache(maxsize=64)
def _size(path: str) -> tuple[int, int]:
    return _picture(path).size


@functools.lru_cache(maxsize=2)
def _picture(path: str) -> Image.Image:
    """The image of an upload, decoded once for the previews of the same file."""
    return load_image(path)


@functools.lru_cache(maxsize=64)
def _digest(path: str) -> str:
    """The file's SHA-256 (an upload's path is new for every upload, so a path's file does not change)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _chosen(method: str, settings) -> dict:
    """The settings of `method` among the values of every method's controls (in SETTINGS order)."""
    return {f.name: _typed(f, v) for (m, f), v in zip(SETTINGS, settings) if m == method}


def _typed(f: dataclasses.Field, value):
    """A control's value as the setting's type (sliders send floats)."""
    return int(value) if f.type in ("int", int) else value


def _speed(which: str, r) -> str:
    t = r.timing
    line = f"{which}: {r.tokens['generated']} tokens"
    if t["ttft_s"] is not None:
        line += f", first after {t['ttft_s']:.2f} s"
    if t["decode_tokens_per_s"] is not None:
        line += f", {t['decode_tokens_per_s']:.1f} tokens/s"
    return line + ("" if r.done else " …")


def gpu_seconds(image, prompt, method, budget, compare, max_new_tokens, *rest) -> int:
    """How long a ZeroGPU slot an explore call asks for: generous for a 7B model at ~10 tokens/s."""
    return min(300, 20 + int(max_new_tokens) * (2 if compare else 1) // 10)


def sweep_seconds(image, prompt, methods, budgets, max_new_tokens, *rest) -> int:
    cells = 1 + (len(methods or []) + 1) * len(str(budgets).split(","))  # the floor: one more per budget
    return min(600, 10 + cells * (5 + int(max_new_tokens) // 10))


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


def _on_click(explorer: Explorer, view: int):
    def on_click(shown, evt: gr.SelectData) -> str:
        return explorer.click(view, shown, *evt.index)

    return on_click


def _on_profile(view: int):
    def on_click(read, head, evt: gr.SelectData):
        return layer_profile(read, view, head, *evt.index)

    return on_click


class Inputs(NamedTuple):
    """The left column: what a run is asked with."""

    image: gr.Image
    prompt: gr.Textbox
    method: gr.Dropdown
    budget: gr.Slider
    count: gr.Markdown
    controls: list  # one per method setting, in SETTINGS order
    max_new_tokens: gr.Slider
    compare: gr.Checkbox
    go: gr.Button
    stop: gr.Button


class Layers(NamedTuple):
    note: gr.Markdown
    go: gr.Button
    layer: gr.Slider
    head: gr.Dropdown
    views: list  # thumbnail, crops
    profile: gr.Plot
    profiled: gr.Markdown
    read: gr.State


class Versus(NamedTuple):
    other: gr.Dropdown
    go: gr.Button
    views: list  # thumbnail, crops
    answer_a: gr.Textbox
    answer_b: gr.Textbox
    table: gr.Dataframe


class Sweep(NamedTuple):
    methods: gr.CheckboxGroup
    budgets: gr.Textbox
    column: gr.Dropdown
    go: gr.Button
    plot: gr.Plot
    rows: gr.Dataframe
    measured: gr.State  # the rows behind the plot
    cache: gr.State


class Accuracy(NamedTuple):
    folder: str | None  # --eval-dir: where `python -m explorer eval` wrote its summaries (server side only)
    found: gr.Dropdown
    upload: gr.File
    x: gr.Dropdown
    plot: gr.Plot
    table: gr.Dataframe
    rows: gr.State  # the rows behind the plot


class Picture(NamedTuple):
    """The live picture: what the method keeps at the budget, redrawn as it moves, with no LLM run."""

    viewer: gr.HTML  # the zoomable picture (assets/viewer): a value per change, the image's scene asked once
    busy: gr.State  # whether the last preview found the model busy with a run
    overlays: list  # the last run's pictures as PNG files (thumbnail, crops), in an accordion


class Animate(NamedTuple):
    frames: gr.Slider
    go: gr.Button
    shown: gr.Image
    file: gr.File


class Explored(NamedTuple):
    """What a run updates, in the order the /explore API returns them (OUTPUTS); `Explorer.explore` names them."""

    overlay_0: gr.Image
    overlay_1: gr.Image
    heat_0: gr.Image
    heat_1: gr.Image
    map_choice: gr.Radio
    plot: gr.Plot
    answer: gr.Textbox
    full_answer: gr.Textbox
    table: gr.Dataframe
    strip: gr.HTML
    live: gr.Markdown
    explanation: gr.Markdown
    shown: gr.State
    memo: gr.State
    viewer: gr.HTML  # the live picture, showing the run's choice


class Page(NamedTuple):
    status: gr.Markdown
    inputs: Inputs
    explored: Explored
    picture: Picture
    steps: gr.HTML
    layers: Layers
    versus: Versus
    sweep: Sweep
    animate: Animate
    accuracy: Accuracy
    picked: gr.Markdown
    export: gr.Button
    exported: gr.File


OUTPUTS = Explored._fields


def build(explorer: Explorer, queue_size: int = 32, eval_dir: str | None = None) -> gr.Blocks:
    """The app's layout and wiring around one `Explorer`; `eval_dir`: summaries for the Accuracy tab."""
    with gr.Blocks(title="Token-drop explorer", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Token-drop explorer\nSee which visual tokens a reduction method keeps in a high-resolution "
            "vision-language model, and what it saves."
        )
        status = gr.Markdown("⏳ loading the model…")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):  # on a narrow screen the columns stack, this one first
                inputs = inputs_column()
            with gr.Column(scale=3, min_width=320):
                inputs.budget.render()  # right above the picture, also when the columns stack
                inputs.count.render()
                with gr.Tab("Kept vs dropped"):
                    picture = picture_tab(explorer)
                with gr.Tab("Scores"):
                    map_choice = gr.Radio(["scores"], value="scores", label="Map")
                    heats = pair("thumbnail: scores", "crops: scores")
                with gr.Tab("Budget"):
                    plot = gr.Plot(label="How the budget was spent")
                with gr.Tab("Steps"):
                    steps = steps_tab()
                with gr.Tab("Layers"):
                    layers = layers_tab()
                with gr.Tab("Two methods"):
                    versus = versus_tab()
                with gr.Tab("Sweep"):
                    sweep = sweep_tab()
                with gr.Tab("Animation"):
                    animate = animation_tab()
                with gr.Tab("Accuracy"):
                    accuracy_ = accuracy_tab(eval_dir)
                picked = gr.Markdown("Click a patch on a picture to see its partition, cell, score and fate.")
                answers = answers_block()
                with gr.Row():
                    export = gr.Button("Download report", scale=1)
                    exported = gr.File(label="Report (HTML) and result (JSON)", file_count="multiple", scale=3)
        states = (gr.State(), gr.State({}))
        explored = Explored(*picture.overlays, *heats, map_choice, plot, *answers, *states, picture.viewer)
        tabs = (steps, layers, versus, sweep, animate, accuracy_)
        wire(explorer, demo, Page(status, inputs, explored, picture, *tabs, picked, export, exported))
    return demo.queue(default_concurrency_limit=1, max_size=queue_size)  # a full queue answers "try again"


def inputs_column() -> Inputs:
    image = gr.Image(type="filepath", label="Image (upload, drop or paste)", sources=["upload", "clipboard"])
    prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0][1], lines=2)
    method = gr.Dropdown(
        [(f"{name}: {cls.summary}", name) for name, cls in METHODS.items()], value="hired", label="Method"
    )
    budget = gr.Slider(1, 100, value=20, step=1, label="Budget: % of the visual tokens", render=False)
    count = gr.Markdown(render=False)
    with gr.Accordion("Method settings", open=False):
        controls = [control(m, f, visible=m == "hired") for m, f in SETTINGS]
    with gr.Accordion("Generation", open=False):
        max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
    compare = gr.Checkbox(value=True, label="Compare with the full run (no reduction)")
    with gr.Row():
        go = gr.Button("Run", variant="primary", scale=3)
        stop = gr.Button("Stop", scale=1)
    gr.Examples([[str(ASSETS / f), p] for f, p in EXAMPLES], [image, prompt], label="Examples", elem_id="examples")
    return Inputs(image, prompt, method, budget, count, controls, max_new_tokens, compare, go, stop)


def pair(*labels: str) -> list[gr.Image]:
    """Two pictures side by side: the thumbnail's and the crops'."""
    with gr.Row():
        return [gr.Image(label=label, format="png", interactive=False) for label in labels]


def picture_tab(explorer: Explorer) -> Picture:
    def scene(key: str) -> dict | None:  # what the page's picture asks for once per image: `server.scene(key)`
        return explorer.scene(key)

    html = dict(html_template=VIEWER["html"], css_template=VIEWER["css"], js_on_load=VIEWER["js"])
    viewer = gr.HTML(None, **html, apply_default_css=False, server_functions=[scene], elem_id="picture")
    with gr.Accordion("Full-resolution pictures (PNG; click a patch)", open=False):
        overlays = pair("thumbnail", "crops")
    return Picture(viewer, gr.State(False), overlays)


def steps_tab() -> gr.HTML:
    gr.Markdown("What the method saw and did, stage by stage, on the last run.")
    return gr.HTML(css_template=draw.CARDS_CSS, elem_id="steps")


def animation_tab() -> Animate:
    gr.Markdown(
        "The kept set shrinking as the budget goes from 100% to 5%, with the count on every frame, for slides. "
        "It is drawn from the cached vision pass: no LLM run."
    )
    with gr.Row():
        frames = gr.Slider(2, 40, value=20, step=1, label="Frames (budgets from 100% down to 5%)")
        go = gr.Button("Make the animation (GIF)")
    shown = gr.Image(type="filepath", label="Budget animation", interactive=False)
    return Animate(frames, go, shown, gr.File(label="Download the GIF"))


def layers_tab() -> Layers:
    note = gr.Markdown(LAYERS_CLS)
    with gr.Row():
        go = gr.Button("Read every layer of this image")
        layer = gr.Slider(0, 1, value=0, step=1, label="Vision layer")
        head = gr.Dropdown(["all heads, summed"], value="all heads, summed", label="Heads")
    views = pair("thumbnail", "crops")
    with gr.Row():
        profile = gr.Plot(label="The clicked patch, layer by layer")
        profiled = gr.Markdown()
    return Layers(note, go, layer, head, views, profile, profiled, gr.State())


def versus_tab() -> Versus:
    gr.Markdown(
        "The method picked on the left (A) against another (B) at the same budget. Kept by both: "
        "untouched; only by A: blue; only by B: orange; by neither: greyed and darkened."
    )
    with gr.Row():
        other = gr.Dropdown(list(METHODS), value="cls", label="Method B (default settings)")
        go = gr.Button("Compare")
    views = pair("thumbnail", "crops")
    with gr.Row():
        answer_a = gr.Textbox(label="Answer A", lines=3, interactive=False)
        answer_b = gr.Textbox(label="Answer B", lines=3, interactive=False)
    table = gr.Dataframe(headers=["", "A", "B", "A / B"], interactive=False, wrap=True)
    return Versus(other, go, views, answer_a, answer_b, table)


def sweep_tab() -> Sweep:
    with gr.Row():
        methods = gr.CheckboxGroup(list(METHODS)[1:], value=["cls", "hired", "random"], label="Methods")
        budgets = gr.Textbox("100,60,40,20,10,5", label="Budgets (%)")
    with gr.Row():
        column = gr.Dropdown([(t, k) for k, t in bench.PLOTS.items()], value="ttft_s", label="Plot")
        go = gr.Button("Run the sweep")
    plot = gr.Plot(label="Against the visual tokens kept")
    rows = gr.Dataframe(headers=SWEEP, interactive=False, wrap=True)
    return Sweep(methods, budgets, column, go, plot, rows, gr.State([]), gr.State({}))


def accuracy_tab(eval_dir: str | None) -> Accuracy:
    gr.Markdown(
        "Accuracy on a benchmark against the visual tokens kept, a line per method, the unreduced model dotted: "
        "the `summary.json` of `python -m explorer eval` (see docs/EVAL.md)."
    )
    found = summaries(eval_dir)
    with gr.Row():
        picked = gr.Dropdown(found, value=found[0] if found else None, label=f"In {eval_dir}", visible=bool(eval_dir))
        upload = gr.File(label="Or upload a summary.json", file_types=[".json"], type="filepath")
        x = gr.Dropdown([(t, k) for k, t in accuracy.AXES.items()], value="visual_kept_mean", label="Against")
    plot = gr.Plot(label="Accuracy against the visual tokens kept")
    table = gr.Dataframe(headers=accuracy.HEADERS, interactive=False, wrap=True)
    return Accuracy(eval_dir, picked, upload, x, plot, table, gr.State([]))


def summaries(eval_dir: str | None) -> list[str]:
    """Every summary.json under `eval_dir`, as paths relative to it."""
    if not eval_dir or not Path(eval_dir).is_dir():
        return []
    return sorted(str(path.relative_to(eval_dir)) for path in Path(eval_dir).rglob("summary.json"))


@handler
def shown_summary(path: str | None, x: str) -> tuple:
    """The chart, the table and the rows of a summary.json (None: nothing to show)."""
    if not path:
        return None, [], []
    rows = accuracy.read(path)
    return accuracy.figure(rows, x), accuracy.cells(rows), rows


def answers_block() -> tuple:
    """The answers, the drift strip, the live line, the table of numbers and the method in words."""
    with gr.Row():
        answer = gr.Textbox(label="Reduced answer", lines=5, interactive=False)
        full_answer = gr.Textbox(label="Full answer", lines=5, interactive=False)
    strip, live = gr.HTML(), gr.Markdown()
    table = gr.Dataframe(headers=TABLE, interactive=False, wrap=True)
    return answer, full_answer, table, strip, live, gr.Markdown(vis.explain("hired"))


GPU_QUEUE = dict(concurrency_id="gpu", concurrency_limit=1)  # one model, one request on it at a time


def wire(explorer: Explorer, demo: gr.Blocks, page: Page) -> None:
    """Every event of the page, each with an api_name."""
    inputs, explored = page.inputs, page.explored
    running = wire_explore(explorer, page)
    inputs.stop.click(None, cancels=running, api_name="stop")  # the run stops at its next token
    wire_preview(explorer, inputs, page.picture, running)  # the count follows with the picture

    def shown_settings(chosen):
        return [gr.update(visible=m == chosen) for m, _ in SETTINGS] + [explorer.explain(chosen)]

    inputs.method.change(shown_settings, inputs.method, [*inputs.controls, explored.explanation], api_name="settings")
    for i, view in enumerate([(explored.overlay_0, explored.heat_0), (explored.overlay_1, explored.heat_1)]):
        for picture in view:
            picture.select(_on_click(explorer, i), explored.shown, page.picked, api_name=f"click_{i}")
    explored.map_choice.change(
        lambda which, shown: tuple(explorer.remap(which, shown).get(f"heat_{i}", gr.skip()) for i in range(2)),
        [explored.map_choice, explored.shown],
        [explored.heat_0, explored.heat_1],
        api_name="map",
    )
    page.export.click(explorer.report, explored.shown, page.exported, api_name="report")
    running.success(
        lambda shown: draw.cards(teach.steps(shown["picture"], shown["result"])) if shown else "",
        explored.shown,
        page.steps,
        api_name="steps",
    )
    wire_layers(explorer, inputs, page.layers)
    wire_versus(explorer, inputs, page.versus)
    wire_sweep(explorer, inputs, page.sweep)
    wire_animate(explorer, inputs, page.animate)
    wire_accuracy(demo, page.accuracy)
    demo.load(explorer.status, None, page.status, api_name="status")
    fitted = [inputs.method, page.versus.other, page.sweep.methods, explored.explanation, page.layers.note]
    demo.load(explorer.for_model, None, fitted, api_name="for_model")


def wire_explore(explorer: Explorer, page: Page):
    """Run: the method, then the full model; returns the event, for Stop to cancel."""

    def explore(*args):
        for changes in explorer.explore(*args):
            yield tuple(changes.get(name, gr.skip()) for name in OUTPUTS)

    # named parameters for API callers: client.predict(image=..., method="cls", budget=10, api_name="/explore")
    named(explore, "image", "prompt", "method", "budget", "compare", "max_new_tokens", "memo")
    explore = GPU(explore, duration=gpu_seconds)  # on ZeroGPU it runs in a GPU worker process
    i, e = page.inputs, page.explored
    asked = [i.image, i.prompt, i.method, i.budget, i.compare, i.max_new_tokens, e.memo, *i.controls]
    return i.go.click(explore, asked, list(e), api_name="explore", preprocess=False, **GPU_QUEUE)


def named(function, *names: str) -> None:
    """Give `function` the parameters `names` and then one per method setting ("hired_alpha", ...), for
    API callers: client.predict(image=..., method="cls", budget=10, hired_alpha=0.4, api_name=...)."""
    names += tuple(f"{m}_{f.name}".replace("+", "_plus").replace("-", "_") for m, f in SETTINGS)
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    function.__signature__ = inspect.Signature([inspect.Parameter(n, keyword) for n in names])


# live events: the last change wins, no spinner over the picture, their own queue (never behind a run)
LIVE = dict(trigger_mode="always_last", show_progress="hidden", concurrency_id="live", concurrency_limit=8)


def wire_preview(explorer: Explorer, inputs: Inputs, picture: Picture, running) -> None:
    """The picture and the count follow every change of image, method, budget or setting (/preview),
    and, after a run, the preview the busy model held up."""

    def live(*args):
        return explorer.preview(*args)

    def refresh(*args):
        return explorer.refresh(*args)

    named(live, "image", "method", "budget", "busy")
    asked = [inputs.image, inputs.method, inputs.budget, picture.busy, *inputs.controls]
    outputs = [picture.viewer, inputs.count, picture.busy]
    changes = [inputs.image.change, inputs.method.change, inputs.budget.change, *(c.change for c in inputs.controls)]
    options = dict(preprocess=False, **LIVE)
    gr.on(changes, live, asked, outputs, api_name="preview", **options)
    running.then(refresh, asked, outputs, api_name="refresh", **options)


def wire_animate(explorer: Explorer, inputs: Inputs, tab: Animate) -> None:
    asked = [inputs.image, inputs.method, tab.frames, *inputs.controls]
    options = {**LIVE, "show_progress": "full", "concurrency_id": "animation", "concurrency_limit": 2}
    tab.go.click(explorer.animate, asked, [tab.shown, tab.file], api_name="animate", preprocess=False, **options)


def wire_layers(explorer: Explorer, inputs: Inputs, tab: Layers) -> None:
    layers = GPU(explorer.layers, duration=60)
    outputs = [tab.read, tab.layer, tab.head, *tab.views]
    tab.go.click(layers, [inputs.image, inputs.prompt], outputs, api_name="layers", preprocess=False, **GPU_QUEUE)
    for control_ in (tab.layer, tab.head):
        control_.change(layer_pictures, [tab.read, tab.layer, tab.head], tab.views, api_name="layer")
    for i, picture in enumerate(tab.views):
        picture.select(_on_profile(i), [tab.read, tab.head], [tab.profile, tab.profiled], api_name=f"profile_{i}")


def wire_versus(explorer: Explorer, inputs: Inputs, tab: Versus) -> None:
    versus = GPU(explorer.versus, duration=gpu_seconds)
    asked = [inputs.image, inputs.prompt, inputs.method, tab.other, inputs.budget, inputs.max_new_tokens]
    outputs = [*tab.views, tab.answer_a, tab.answer_b, tab.table]
    tab.go.click(versus, [*asked, *inputs.controls], outputs, api_name="versus", preprocess=False, **GPU_QUEUE)


def wire_sweep(explorer: Explorer, inputs: Inputs, tab: Sweep) -> None:
    sweep = GPU(explorer.sweep, duration=sweep_seconds)
    asked = [inputs.image, inputs.prompt, tab.methods, tab.budgets, inputs.max_new_tokens, tab.column, tab.cache]
    tab.go.click(sweep, asked, [tab.plot, tab.rows, tab.measured, tab.cache], api_name="sweep", **GPU_QUEUE)
    redraw = lambda column, rows: bench.figure(rows, column) if rows else None  # noqa: E731
    tab.column.change(redraw, [tab.column, tab.measured], tab.plot, api_name="replot")


def wire_accuracy(demo: gr.Blocks, tab: Accuracy) -> None:
    def found(name: str | None, x: str):  # a name from the list, never a path a visitor makes up
        known = summaries(tab.folder)
        return shown_summary(str(Path(tab.folder) / name) if name in known else None, x)

    shown = [tab.plot, tab.table, tab.rows]
    tab.found.change(found, [tab.found, tab.x], shown, api_name="accuracy")
    tab.upload.upload(shown_summary, [tab.upload, tab.x], shown, api_name="accuracy_upload")
    tab.x.change(
        lambda x, rows: accuracy.figure(rows, x) if rows else None,
        [tab.x, tab.rows],
        tab.plot,
        api_name="accuracy_axis",
    )
    demo.load(found, [tab.found, tab.x], shown, api_name="accuracy_first")


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="The token-drop explorer app.")
    parser.add_argument(
        "--model",
        default=env("EXPLORER_MODEL"),
        help="Hub id, local folder, or a random-weight tiny-* model such as tiny-llava-next; visitors cannot change "
        "it (default: $EXPLORER_MODEL, else for the hardware: LLaVA-NeXT 7B on a GPU with 20 GiB free, "
        f"LLaVA-OneVision 0.5B on a smaller one, SmolVLM-256M without a GPU; on ZeroGPU {backends.DEFAULT_MODEL}; "
        "without network, when that default is not in the Hugging Face cache, its family's tiny-* model)",
    )
    parser.add_argument(
        "--device", default=env("EXPLORER_DEVICE"), help="cpu, cuda, ... (default: cuda if there is one)"
    )
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--queue", type=int, default=32, help="requests that may wait; more are told to try again")
    parser.add_argument(
        "--eval-dir", default=env("EXPLORER_EVAL_DIR"), help="a folder of `python -m explorer eval` results to show"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    zero_gpu = env("SPACES_ZERO_GPU", "").lower() in ("1", "true")
    # ZeroGPU hands out a big GPU per request, none at start-up: its model is the one the Space preloads
    choice = backends.choose(args.model or (backends.DEFAULT_MODEL if zero_gpu else None), args.device)
    explorer = Explorer(choice.model, args.device, warm_up=not zero_gpu, notice=choice.reason)
    if zero_gpu:  # ZeroGPU wants the model on the device at start-up; the GPU work happens in `explore`
        explorer.backend()
    else:  # start loading before the first visitor comes
        threading.Thread(target=explorer.status, daemon=True).start()
    serve(explorer, args.queue, eval_dir=args.eval_dir, server_name=args.host, server_port=args.port)


def serve(explorer: Explorer, queue_size: int = 32, eval_dir: str | None = None, **launch) -> tuple[gr.Blocks, str]:
    """Build the app and start serving it, uploads over UPLOAD_LIMIT refused; returns it and its URL. The
    browser keeps no record of runs: writing every preview step's outputs to its storage would cost
    ~150 ms a step (measured), and a run's pictures fill the storage quota."""
    demo = build(explorer, queue_size, eval_dir)
    _, url, _ = demo.launch(max_file_size=UPLOAD_LIMIT, run_history=False, css=CSS, **launch)
    return demo, url


if __name__ == "__main__":
    main()
