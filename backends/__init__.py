"""Model families, one file each, and `load`, which picks the family from the checkpoint's config."""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gemma3, internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_5, qwen3_vl, random_models, smolvlm
from .base import pick_device, pick_dtype
from .errors import ExplorerError, first_line
from .geometry import Geometry, Prepared

FAMILIES = (llava_next, llava_onevision, qwen2_vl, qwen3_vl, qwen3_5, smolvlm, llava, gemma3, internvl)  # one file each
BACKENDS = {
    b.model_type: b
    for b in (
        llava_next.LlavaNext,
        llava_onevision.LlavaOnevision,
        qwen2_vl.Qwen2VL,
        qwen2_vl.Qwen25VL,
        qwen3_vl.Qwen3VL,
        qwen3_vl.Qwen3VLMoe,
        qwen3_5.Qwen35,
        qwen3_5.Qwen35Moe,
        smolvlm.SmolVLM,
        smolvlm.SmolVLM2,
        llava.Llava,
        gemma3.Gemma3,
        internvl.InternVL,
    )
}  # config.model_type -> backend
RANDOM = {name: f.random_parts for f in FAMILIES for name in f.RANDOM}  # random-weight model -> (config, processor)
FULL_SIZE = {  # Hub checkpoint -> the tiny model with its processor; its architecture is stored in configs/
    "llava-hf/llava-v1.6-vicuna-7b-hf": "tiny-llava-next",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "tiny-llava-next",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "tiny-llava-onevision",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "tiny-llava-onevision",
    "Qwen/Qwen2-VL-2B-Instruct": "tiny-qwen2-vl",
    "Qwen/Qwen2-VL-7B-Instruct": "tiny-qwen2-vl",
    "Qwen/Qwen3-VL-2B-Instruct": "tiny-qwen3-vl",
    "Qwen/Qwen3.5-0.8B": "tiny-qwen3.5",
    "Qwen/Qwen3.5-27B": "tiny-qwen3.5",  # sizes as public copies give them (tests/test_qwen3_5.py)
    "google/gemma-3-4b-it": "tiny-gemma3",
    "OpenGVLab/InternVL3-1B-hf": "tiny-internvl3",
}
OFFLINE = {  # a default checkpoint -> the random-weight model of its family, when it cannot be fetched
    llava_next.DEFAULT: "tiny-llava-next",
    llava_onevision.DEFAULT: "tiny-llava-onevision",
    smolvlm.DEFAULT: "tiny-idefics3",
}
CONFIGS = Path(__file__).parent / "configs"
DEFAULT_MODEL = llava_next.DEFAULT  # the HiRED paper's model: the Space's, and the default on a big GPU
BIG_GPU = 20 * 2**30  # free bytes LLaVA-NeXT 7B wants: ~15 GiB of bf16 weights, the rest for activations

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "Choice",
    "FULL_SIZE",
    "RANDOM",
    "ExplorerError",
    "Geometry",
    "Prepared",
    "choose",
    "default_model",
    "load",
    "real_architecture",
    "stored",
    "stored_config",
]


def default_model(device: str | None = None, free_bytes: int | None = None) -> str:
    """The checkpoint to load when none is named, for the hardware: the HiRED paper's LLaVA-NeXT 7B
    on a GPU with at least BIG_GPU free, LLaVA-OneVision 0.5B (high resolution, small) on a smaller
    GPU, SmolVLM-256M without one. `free_bytes`: the GPU's free memory, measured when not given."""
    device = pick_device(device)
    if device.type != "cuda":
        return smolvlm.DEFAULT
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return DEFAULT_MODEL if free_bytes >= BIG_GPU else llava_onevision.DEFAULT


@dataclass(frozen=True)
class Choice:
    """The model to load, and why it is not the one asked for (empty when it is)."""

    model: str
    reason: str = ""


def choose(model: str | None, device: str | None = None, random_weights: bool = False) -> Choice:
    """The model to load when `model` (or None) is asked for on `device`. A named model is loaded as named:
    if it cannot be had, `load` says why. Without one, the hardware's default (`default_model`), unless
    it cannot be fetched (not in the Hugging Face cache, and the Hub cannot be reached or HF_HUB_OFFLINE
    is set): then the tiny random-weight model of its family, which needs nothing, and the reason.
    With `random_weights` nothing is fetched, so the default stays."""
    if model:
        return Choice(model)
    default = default_model(device)
    if random_weights or _in_cache(default) or not _offline():
        return Choice(default)
    tiny = OFFLINE[default]
    return Choice(
        tiny,
        f"No model was named, and {default}, the default for this hardware, is not in the Hugging Face cache "
        "and the Hub is out of reach (no network, or HF_HUB_OFFLINE set), so its family's random-weight model "
        f"{tiny} is loaded. To load a real one, pass --model or set EXPLORER_MODEL to a local checkpoint folder, "
        "or to a Hub id with network.",
    )


def _in_cache(repo: str) -> bool:
    """Whether the Hugging Face cache holds `repo`'s config and weights (one file or a sharded index)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(file: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, file), str)  # a path; None or a marker when not

    return cached("config.json") and (cached("model.safetensors") or cached("model.safetensors.index.json"))


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or _unreachable_hub() is not None


def load(model: str, device: str | None = None, random_weights: bool = False):
    """Load a checkpoint from a local folder, the Hugging Face cache or the Hub, or build a random one:
    a tiny-* model, or with `random_weights` one of the FULL_SIZE architectures (see `full_size`)."""
    device = pick_device(device)
    if random_weights:
        return full_size(model, device)
    random_weights = model in RANDOM
    path = _random_checkpoint(model).name if random_weights else model
    folder = Path(path).expanduser()
    local = folder.is_dir()
    if local and not (folder / "config.json").is_file():
        raise ExplorerError(f"{model} has no config.json, so it is not a Hugging Face checkpoint folder")
    if not local and (folder.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ExplorerError(f"{model} is not a checkpoint folder (no such folder)")
    path = str(folder) if local else path
    try:  # a folder, or a model already in the Hugging Face cache: no network needed
        return _load(path, device, model, random_weights, local_files_only=True)
    except OSError as e:
        if local:
            raise ExplorerError(f"could not load {model}: {first_line(e)}") from None
    host = _unreachable_hub()
    try:
        if host:  # fail now, not after huggingface_hub's retries
            raise OSError(f"{host} cannot be reached")
        return _load(path, device, model, random_weights, local_files_only=False)
    except OSError as e:
        raise ExplorerError(
            f"{model} is not a local folder and could not be loaded from the Hugging Face cache or the Hub "
            f"({first_line(e)}). Without network, download it elsewhere first, pass a local checkpoint "
            "with --model PATH, or try --model tiny-llava-next (random weights, runs offline)."
        ) from None


def _unreachable_hub() -> str | None:
    """The Hub's host name when it does not resolve (no network); None when it does or a proxy decides."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def _load(path: str, device, name: str, random_weights: bool, local_files_only: bool):
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(path, local_files_only=local_files_only).model_type
    except ValueError as e:
        raise ExplorerError(f"{name} is not a checkpoint transformers recognises: {first_line(e)}") from None
    if model_type not in BACKENDS:
        raise ExplorerError(
            f"{name} is a {model_type!r} checkpoint; the explorer runs {', '.join(BACKENDS)} checkpoints"
        )
    try:
        return BACKENDS[model_type].load(path, device, name, random_weights, local_files_only=local_files_only)
    except torch.OutOfMemoryError:
        raise ExplorerError(f"{name} does not fit in the memory of {device}; try a smaller model") from None
    except ValueError as e:
        raise ExplorerError(f"could not load {name}: {first_line(e)}") from None


def full_size(model: str, device: torch.device, dtype: torch.dtype | None = None):
    """The architecture of the Hub checkpoint `model` with random weights, built on `device` from the
    config stored in configs/ (layer sizes, heads, vocabulary, vision tower and image geometry of the
    real one), with the processor and token ids of its family's tiny model: speed and memory are the
    real model's, measured without downloading anything, and the answers are gibberish."""
    if model not in FULL_SIZE:
        raise ExplorerError(f"no stored architecture for {model!r}; --random-weights builds: {', '.join(FULL_SIZE)}")
    tiny, processor = RANDOM[FULL_SIZE[model]](FULL_SIZE[model])
    stored = json.loads((CONFIGS / f"{model.replace('/', '--')}.json").read_text())
    backend = BACKENDS[tiny.model_type]
    built = random_models.full_size(backend.model_class, tiny, stored, device, dtype or pick_dtype(device))
    return backend(built, processor, model, random_weights=True)


def stored(model_type: str | None = None) -> list[str]:
    """The Hub checkpoints whose architecture configs/ holds (of one model type, when given): the FULL_SIZE
    ones, which `--random-weights` builds, and each family's published checkpoint, whose cost a run on a
    small stand-in is projected on (`real_architecture`)."""
    names = sorted(path.stem.replace("--", "/", 1) for path in CONFIGS.glob("*.json"))
    return [name for name in names if model_type is None or stored_config(name).model_type == model_type]


@functools.cache
def stored_config(model: str):
    """The transformers config of the Hub checkpoint `model`, from its architecture stored in configs/."""
    from transformers import CONFIG_MAPPING

    path = CONFIGS / f"{model.replace('/', '--')}.json"
    if not path.is_file():
        raise ExplorerError(f"no stored architecture for {model!r}; configs/ holds: {', '.join(stored())}")
    values = json.loads(path.read_text())
    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def real_architecture(backend, model: str | None = None) -> str | None:
    """The Hub checkpoint whose stored architecture a run's cost is projected on: `model` when one is asked
    for (a stored architecture of the backend's model type); else, for a random-weight model, its own when
    it is a full-size one, or its family's published checkpoint; None for a real checkpoint."""
    if model is None and not backend.random_weights:
        return None
    model = model or (backend.name if backend.name in FULL_SIZE else backend.default)
    if model not in stored(backend.model_type):
        raise ExplorerError(
            f"no stored {backend.family} architecture {model!r} to project the cost on; configs/ holds "
            f"{', '.join(stored(backend.model_type)) or 'none'} of this family"
        )
    return model


@functools.cache
def _random_checkpoint(name: str) -> tempfile.TemporaryDirectory:
    folder = tempfile.TemporaryDirectory(prefix=f"{name}-")  # kept by the cache, removed at exit
    config, processor = RANDOM[name](name)
    random_models.save_random(BACKENDS[config.model_type].model_class, config, processor, Path(folder.name))
    return folder
