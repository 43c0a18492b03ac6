"""What the app serves and keeps: one model, loaded on first use and shared by every visitor, and the caches
of the page, one per kind, each with its bound. What a visitor keeps (full runs, sweep cells) lives in
their own `gr.State`, bounded by `MEMO`.

| cache            | holds                                              | bound                              |
|------------------|----------------------------------------------------|------------------------------------|
| `Session.vision` | vision passes and geometries (`VisionCache`)       | the last 2 images, 8 passes        |
| `Session.files`  | image key -> its file, for the page's scene        | 64 images                          |
| `picture`        | the decoded image of an upload                     | 2 images                           |
| `digest`         | an upload's SHA-256                                | 64 files                           |
| `Session.previews` | each visitor's newest preview asked              | 1024 visitors                      |
| `Session.clips`  | a video clip's vision passes and geometry          | the last clip, 4 passes            |
| `Session.videos` | clip key -> its file and frame count               | 64 clips                           |
| `video`          | the sampled frames of a clip                       | 2 clips                            |
"""

from __future__ import annotations

try:  # Hugging Face ZeroGPU; imported before anything touches CUDA, and a no-op when not on ZeroGPU
    from spaces import GPU
except ImportError:

    def GPU(task=None, **options):
        return task if task is not None else lambda task: task


import functools
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

import backends
from explorer import METHODS, ExplorerError, load_image, run
from explorer.engine.video import Clip, load_video
from explorer.methods import on_images, unavailable
from explorer.views import viewer
from explorer.views import visual as vis
from explorer.views.clip import clip_pass, frame_scene
from explorer.views.preview import VisionCache, vision_pass

MEMO = 2  # full runs, and sweeps, kept per visitor (each full run with its (T, V) log-probabilities)
FILES = 64
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


class Session:
    """One model, loaded on first use (with a short warm-up run), and what the page caches for it."""

    def __init__(self, model: str, device: str | None = None, warm_up: bool = True, notice: str = ""):
        self.model, self.device, self.warm_up = model, device, warm_up
        self.notice = notice  # why this model and not the one the operator would expect (`backends.choose`)
        self._lock = threading.Lock()
        self._backend = None
        self.files: OrderedDict[str, str] = OrderedDict()  # image key -> its file, the last FILES previewed

        # the preview's vision passes; on ZeroGPU each runs in a GPU worker and hands its signals back on the
        # CPU (the worker's memory is gone after the call): only the picture and the signal names travel
        @functools.partial(GPU, duration=30)
        def on_gpu(picture, needs):
            return vision_pass(self.backend(), picture, needs).cpu()

        def in_a_worker(backend, picture, needs, wait_s):
            return on_gpu(picture, needs) if needs else vision_pass(backend, picture, needs)  # geometry: no GPU

        self.vision = VisionCache(compute=in_a_worker if ZERO_GPU else vision_pass)
        self.previews = Newest()

        @functools.partial(GPU, duration=60)
        def clip_on_gpu(clip, needs):
            return clip_pass(self.backend(), clip, needs).cpu()

        def clip_in_a_worker(backend, clip, needs, wait_s):
            return clip_on_gpu(clip, needs) if needs else clip_pass(backend, clip, needs)

        self.clips = VisionCache(images=1, entries=4, compute=clip_in_a_worker if ZERO_GPU else clip_pass)
        self.videos: OrderedDict[str, tuple[str, int]] = OrderedDict()  # clip key -> (file, frames)

    @property
    def loaded(self) -> bool:
        return self._backend is not None

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
        line = f"**Model**: {b.name} ({b.family}) on {b.device}" + (weights(b) if b.random_weights else "")
        line += f"\n\n⚠️ {self.notice}" if self.notice else ""
        reasons = [reason for name in on_images() if (reason := unavailable(name, b))]
        return line + "".join(f"\n- not on this model: {reason}" for reason in reasons)

    def runnable(self) -> list[str] | None:
        """The methods that run on the model (None when it cannot be loaded: the status says why)."""
        try:
            b = self.backend()
        except ExplorerError:
            return None
        return [name for name in METHODS if not unavailable(name, b)]

    def explain(self, method: str) -> str:
        """The method in plain words, for the loaded model's vision encoder (with or without [CLS])."""
        return vis.explain(method, None if self._backend is None else self._backend.cls_token)

    def key(self, path: str) -> str:
        """Names an image for this model (its cached vision passes, the page's scene), and remembers its file."""
        key = f"{self.model} {digest(path)}"
        self.files[key] = path
        self.files.move_to_end(key)
        while len(self.files) > FILES:
            self.files.popitem(last=False)
        return key

    def scene(self, key: str) -> dict | None:
        """The image `key` names and where its visual tokens sit, for the page's picture (None when the
        key is not one of the last images previewed)."""
        path = self.files.get(key)
        if path is None:
            return None
        shown = picture(path)
        seen, _ = self.vision.get(self.backend(), shown, (), key)  # the geometry: no model work
        return viewer.scene(shown, seen.geometry, key)

    def clip_key(self, path: str, frames: int) -> str:
        """Names a clip sampled to `frames` frames for this model, and remembers its file."""
        key = f"{self.model} {digest(path)} {frames}"
        self.videos[key] = (path, frames)
        self.videos.move_to_end(key)
        while len(self.videos) > FILES:
            self.videos.popitem(last=False)
        return key

    def clip(self, key: str) -> Clip | None:
        """The clip `key` names (None when it is not one of the last previewed)."""
        return video(*self.videos[key]) if key in self.videos else None

    def frame_scene(self, key: str) -> dict | None:
        """The scene of frame (or temporal group) p of a clip, for the page's picture: `key` is
        "<clip key> @<p>" (None when the clip is not one of the last previewed)."""
        clip_key, _, p = key.rpartition(" @")
        clip = self.clip(clip_key)
        if clip is None:
            return None
        seen, _ = self.clips.get(self.backend(), clip, (), clip_key)  # the processor only: no model work
        return frame_scene(clip, seen.geometry, seen.geometry.frames[int(p)], key)


def weights(backend) -> str:
    """What a random-weight model's numbers are: its token counts and overlays the real checkpoint's (same
    processor geometry); its times and memory its own, which on a small stand-in are not the real one's."""
    said = " · **random weights**: answers are gibberish; token counts and overlays are real"
    real = backends.real_architecture(backend)
    if real == backend.name:
        return said + "; times and memory are this full-size architecture's"
    return (
        said + f"; times and memory are this small model's, not {real}'s: the numbers table adds the real "
        "architecture's computed cost"
    )


class Newest:
    """Which preview is each visitor's newest. The page sends one preview at a time, but under load two can
    overlap and finish out of order (Gradio's front end checks for a running one before it records a new
    one); an older one that finishes last would leave the picture behind the slider, so it changes nothing."""

    def __init__(self, visitors: int = 1024):
        self.visitors = visitors
        self._asked: OrderedDict[str | None, int] = OrderedDict()  # visitor -> number of their newest
        self._lock = threading.Lock()

    def ask(self, visitor: str | None) -> tuple[str | None, int]:
        """A new preview of `visitor` (their session): its ticket."""
        with self._lock:
            number = self._asked.pop(visitor, 0) + 1
            self._asked[visitor] = number
            while len(self._asked) > self.visitors:
                self._asked.popitem(last=False)
            return visitor, number

    def newest(self, ticket: tuple[str | None, int]) -> bool:
        visitor, number = ticket
        with self._lock:
            return self._asked.get(visitor) == number


@functools.lru_cache(maxsize=2)
def picture(path: str) -> Image.Image:
    """The image of an upload, decoded once for the previews of the same file."""
    return load_image(path)


@functools.lru_cache(maxsize=2)
def video(path: str, frames: int) -> Clip:
    """The frames sampled from an upload, decoded once for the previews of the same file and count."""
    return load_video(path, frames=frames)


@functools.lru_cache(maxsize=FILES)
def digest(path: str) -> str:
    """The file's SHA-256 (an upload's path is new for every upload, so a path's file does not change)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
