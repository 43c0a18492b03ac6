"""The live preview: which visual tokens a method keeps at a budget, shown without running the LLM.

The vision pass (preprocessing, the vision encoder and the signals a method reads) depends only on
the image, the model and the signal names, so it runs once and is cached (`VisionCache`). A change of
budget, method or settings then runs only the method's selection, `pipeline.choose`, the very step a
measured run takes, on those cached signals: the preview keeps what Run keeps.

    cache = VisionCache()
    shown = preview(backend, picture, "hired", 0.2, cache=cache)   # the first call on an image encodes it
    str(shown.count)                                              # "428 of 2144 visual tokens kept (20%)"

The preview never holds up a run: the vision pass waits at most `wait_s` for the model (the lock a run
holds, `pipeline.model_lock`) and otherwise says the model is busy; selections on cached signals take
no lock at all. Methods that choose inside the LLM (FastV, PyramidDrop, ...) have nothing to show
before it but their step before the LLM, if they have one (MustDrop, AIM: `select_vision`), and
GemFilter ranks by a first pass through the LLM on the prompt, so it too is shown after Run; a method
that merges inside the vision encoder (tome-vit) changes the vision pass itself, so it is shown
after Run.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from PIL import Image

from backends.signals import FEATURES, prompted

from ..core import Budget, ExplorerError, Geometry, Selection, Signals
from ..engine.measure import now
from ..engine.pipeline import check_media, choose, method_for, model_lock, step_budget, vision_needs
from .counts import Count, count

PROMPT = "Describe the image."  # the processor wants a prompt; the vision pass does not read it
WAIT_S = 0.5  # longest wait for a model that a run is using, before the preview says it is busy


class Busy(ExplorerError):
    """The model is busy with a run and the signals the preview needs are not cached yet."""


@dataclass(frozen=True)
class Seen:
    """One vision pass over an image: where its visual tokens sit, and the signals captured by name
    (see `explorer.Signals`); none when only the geometry was asked for."""

    geometry: Geometry
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def cpu(self) -> Seen:
        """The same on the CPU (what a ZeroGPU worker hands back to the main process)."""
        return Seen(self.geometry, {name: value.cpu() for name, value in self.maps.items()})


def vision_pass(backend, picture: Image.Image, needs: tuple[str, ...], wait_s: float = WAIT_S) -> Seen:
    """Preprocess the image and run the vision encoder for the signals `needs`, as a run does (projecting
    only where the family must or the method reads the projected features). Only the geometry, with no
    model work, when `needs` is empty. Raises `Busy` when a run holds the model for longer than `wait_s`."""
    if not needs:
        return Seen(backend.layout([picture.height, picture.width])[0])
    lock = model_lock(backend.model)
    if not lock.acquire(timeout=wait_s):
        raise Busy("the model is busy with a run; the preview follows when it is done")
    try:
        with torch.inference_mode():
            prepared = backend.prepare(picture, PROMPT)
            project = FEATURES in needs or not backend.one_patch_each(prepared)
            _, maps = backend.encode(prepared, needs, project=project)
    finally:
        lock.release()
    return Seen(prepared.geometry, maps)


def digest(picture: Image.Image) -> str:
    """A key for an image's pixels."""
    return hashlib.sha256(f"{picture.mode} {picture.size}".encode() + picture.tobytes()).hexdigest()


class VisionCache:
    """The vision passes of the last `images` images (2 by default), at most `entries` in all, least
    recently used first out: the passes of an older image are freed as soon as a new one comes.
    `compute(backend, picture, needs, wait_s) -> Seen` runs a pass (default `vision_pass`; on ZeroGPU the
    app hands one that runs in a GPU worker and returns `Seen.cpu()`)."""

    def __init__(self, images: int = 2, entries: int = 8, compute=vision_pass):
        self.images, self.entries, self.compute = images, entries, compute
        self._seen: OrderedDict[tuple, Seen] = OrderedDict()  # (model, image, needs) -> pass
        self._lock = threading.Lock()  # guards _seen
        self._computing = threading.Lock()  # one pass at a time, so that two asks for one pass run it once
        self.passes = 0  # vision passes run (with model work), for tests and benchmarks

    def get(self, backend, picture: Image.Image, needs: tuple[str, ...], image: str | None = None, wait_s=WAIT_S):
        """(the pass, whether it was cached): a cached pass of this model and image that holds every signal
        of `needs`, else a new one. `image`: a key for the picture (default: its `digest`)."""
        key = (id(backend.model), image or digest(picture), tuple(needs))
        if (hit := self._cached(key)) is not None:
            return hit, True
        if not needs:  # the geometry alone: no model work, nothing to wait for
            seen = self.compute(backend, picture, (), wait_s)
        else:
            with self._computing:
                if (hit := self._cached(key)) is not None:
                    return hit, True
                seen = self.compute(backend, picture, tuple(needs), wait_s)
                self.passes += 1
        with self._lock:
            self._seen[key] = seen
            self._free()
        return seen, False

    def _cached(self, key: tuple) -> Seen | None:
        """The most recently used pass of the key's model and image that holds all of its signals."""
        model, image, needs = key
        with self._lock:
            for other in reversed(self._seen):
                if other[:2] == (model, image) and set(needs) <= set(other[2]):
                    self._seen.move_to_end(other)
                    return self._seen[other]
        return None

    def _free(self) -> None:
        """Drop every pass of an image older than the last `images`, then the least recently used past `entries`."""
        recent = list(dict.fromkeys(image for _, image, _ in reversed(self._seen)))[: self.images]
        for key in [key for key in self._seen if key[1] not in recent]:
            del self._seen[key]
        while len(self._seen) > self.entries:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class Preview:
    """What a method keeps of one image at a budget, before any LLM run."""

    geometry: Geometry
    selection: Selection  # every token when nothing can be chosen before the LLM (`pending`)
    count: Count  # what the picture shows, str(count): "K of N visual tokens kept (B%)"
    budget: Count  # what the budget means for this image (for an llm-stage method: its layer mean or last cut)
    note: str  # how the picture was made, or why it shows every token
    pending: bool  # the tokens are chosen inside the LLM or the encoder: the picture shows them after Run
    cached: bool  # the vision pass came from the cache
    seconds: float  # the selection's time (the vision pass not included)
    busy: bool = False  # a run held the model and the vision pass was not cached: every token is shown


def preview(
    backend,
    picture: Image.Image,
    method: str,
    budget: Budget | float,
    settings: dict | None = None,
    cache: VisionCache | None = None,
    image: str | None = None,
    wait_s: float = WAIT_S,
) -> Preview:
    """The tokens `method` keeps of `picture` at `budget`, from the cached vision pass (run now if it
    is not cached; `Busy` when a run holds the model). `image`: a key for the picture, see `VisionCache`."""
    chosen, fixed = method_for(backend, method, settings, budget)
    cache = cache if cache is not None else VisionCache()
    pending = chosen.stage == "llm" and chosen.select_vision is None or chosen.merging is not None
    pending |= chosen.early_layer is not None  # it ranks by a first pass through the LLM, on the prompt
    pending |= any(map(prompted, vision_needs(chosen)))  # a CLIP model reads the prompt beside the frames
    needs = () if pending else vision_needs(chosen)
    try:
        seen, cached = cache.get(backend, picture, needs, image, wait_s)
    except Busy as busy:  # the geometry needs no model: every token, and why
        seen, cached = cache.get(backend, picture, (), image, wait_s)
        g = seen.geometry
        meant = count(chosen, fixed, len(g), backend.depth)
        return Preview(g, Selection(keep=torch.arange(len(g))), meant, meant, str(busy), True, cached, 0.0, busy=True)
    g, start = seen.geometry, now()
    check_media(chosen, g)
    b = fixed.resolve(len(g)) if fixed else len(g)
    selection = Selection(keep=torch.arange(len(g)))
    if not pending:
        with torch.inference_mode():
            step = step_budget(chosen, backend.depth, len(g), b if fixed else None)
            selection = choose(chosen, Signals(g, step, seen.maps))
    seconds = now() - start
    meant = count(chosen, fixed, len(g), backend.depth)
    shown = meant if pending else count(chosen, fixed, len(g), backend.depth, len(selection.keep))
    return Preview(g, selection, shown, meant, _note(method, chosen, cached, seconds), pending, cached, seconds)


def _note(method: str, chosen, cached: bool, seconds: float) -> str:
    if chosen.merging is not None:
        return f"{method} merges inside the vision encoder, so the pass itself depends on the budget: Run to see"
    if chosen.early_layer is not None:
        return (
            f"{method} ranks the tokens by a first pass through the LLM's first layers on the prompt: they appear "
            "after Run (the picture shows every token until then)"
        )
    if any(map(prompted, vision_needs(chosen))):
        return (
            f"{method} chooses by how alike the prompt and each frame are, which a CLIP model beside the VLM reads at "
            "Run: its tokens appear after Run (the picture shows every token until then)"
        )
    if chosen.stage == "llm" and chosen.select_vision is None:
        return (
            f"{method} chooses its tokens inside the LLM, from what the prompt attends to: they appear after Run "
            "(the picture shows every token until then)"
        )
    step = " (its step before the LLM; it cuts more inside the LLM, shown after Run)" if chosen.stage == "llm" else ""
    source = "the cached vision pass of this image" if cached else "a vision pass of this image, now cached"
    return f"Preview{step}: {method}'s selection ({1000 * seconds:.0f} ms) on {source}; no LLM run"
