"""Reduction methods: one file each, all listed here (`METHODS`). What a method is: `explorer.core.Method`."""

from __future__ import annotations

import dataclasses
import typing

from ..core import FEATURES, LLM_TRANSITION, ExplorerError, prompted
from .aim import AIM
from .cls import CLS
from .dart import DART
from .divprune import DivPrune
from .dycoke import DyCoke
from .evs import EVS
from .fastv import FastV
from .fastvid import FastVID
from .frames import Frames
from .freevideollm import FreeVideoLLM
from .gemfilter import GemFilter
from .globalcom2 import GlobalCom2
from .hired import HiRED
from .holitom import HoliTom
from .mustdrop import MustDrop
from .none import NoReduction
from .pdrop import PyramidDrop
from .pooling import Pooling
from .prumerge import PruMergePlus
from .random import Random
from .sparsevlm import SparseVLM
from .tome import ToMe
from .tome_vit import ToMeViT
from .transprune import TransPrune
from .transprune_llm import TransPruneLLM
from .uniform import Uniform
from .vidcom2 import VidCom2
from .visionzip import VisionZip
from .vispruner import VisPruner
from .vtccls import VTCCLS

KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
METHODS = {
    "none": NoReduction,
    "random": Random,
    "uniform": Uniform,
    "pooling": Pooling,
    "cls": CLS,
    "vtc-cls": VTCCLS,
    "hired": HiRED,
    "visionzip": VisionZip,
    "prumerge+": PruMergePlus,
    "globalcom2": GlobalCom2,
    "divprune": DivPrune,
    "vispruner": VisPruner,
    "tome": ToMe,
    "tome-vit": ToMeViT,
    "transprune": TransPrune,
    "fastv": FastV,
    "pdrop": PyramidDrop,
    "dart": DART,
    "sparsevlm": SparseVLM,
    "mustdrop": MustDrop,
    "aim": AIM,
    "transprune-llm": TransPruneLLM,
    "gemfilter": GemFilter,
    "frames": Frames,
    "dycoke": DyCoke,
    "free-video-llm": FreeVideoLLM,
    "fastvid": FastVID,
    "holitom": HoliTom,
    "vidcom2": VidCom2,
    "evs": EVS,
}


def on_images() -> list[str]:
    """The methods that run on an image: every one but those that work on the frames of a video."""
    return [name for name, method in METHODS.items() if "clip" not in method.requires]


def make(name: str, **settings):
    """The method `name` with its settings, checked against the field types and ranges."""
    if name not in METHODS:
        raise ExplorerError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    fields = {f.name: f for f in dataclasses.fields(METHODS[name])}
    types = typing.get_type_hints(METHODS[name])
    for key, value in settings.items():
        if key not in fields:
            raise ExplorerError(f"{name} has no setting {key!r}; its settings: {', '.join(fields) or 'none'}")
        if not _is(value, types[key]):
            raise ExplorerError(f"{name}: {key} must be {KINDS[types[key]]}, got {value!r}")
        low, high = fields[key].metadata.get("range", (value, value))
        if not low <= value <= high:  # also refuses NaN
            raise ExplorerError(f"{name}: {key} must be between {low} and {high}, got {value}")
    return METHODS[name](**settings)


def _is(value, kind: type) -> bool:
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def unavailable(name: str, backend, clip: bool = False) -> str | None:
    """Why the method `name` cannot run on the backend's model (on a video `clip`, or an image), in one
    line; None when it can."""
    method = METHODS[name]
    if "clip" in method.requires and not clip:
        return f"{name} works on the frames of a video: it runs on clips, not on images"
    if "thumbnail" in method.requires and not backend.thumbnail:
        return (
            f"{name} needs a thumbnail of the whole image beside high-resolution crops; "
            f"{backend.family} sees the image once, with no thumbnail"
        )
    if "patch tokens" in method.requires and not backend.projects_kept:
        return (
            f"{name} merges patches inside the vision encoder, so it needs every visual token to be one "
            f"encoder patch, projected on its own (LLaVA-NeXT, LLaVA-1.5, LLaVA-OneVision); {backend.family} "
            "makes its tokens from the patches after the encoder. tome merges after the encoder on every family"
        )
    if method.stage == "llm" and backend.decoder().recurrent:  # LLM layers with a recurrent state, no KV cache
        transition = LLM_TRANSITION in method.needs
        if transition or method.compact_from is not None or method.decode_keep is not None:
            does = "reads every layer's token transition" if transition else "cuts KV caches while decoding"
            return (
                f"{name} {does}; most of {backend.family}'s LLM layers are linear-attention ones, whose recurrent "
                "state sums up every token seen, with no attention to read and no cache to cut"
            )
    for signal in method.needs if method.stage == "vision" else method.vision_needs:
        try:
            if signal != FEATURES and not prompted(signal):  # a CLIP model beside the VLM gives those
                backend.signal(signal)
        except ExplorerError as error:
            return f"{name} cannot run on {backend.family}: {error}"
    return None
