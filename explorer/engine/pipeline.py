"""One measured run: image and prompt in, reduced answer out, with token counts, times and memory.

    preprocess -> vision encoder (+ the signals the method needs) -> method.select -> LLM on the kept tokens

Methods of stage "llm" select inside the LLM instead: every visual token goes in (or, for a method
with a step of its own before the LLM, `select_vision`, the tokens that step keeps), and the backend's
hooks cut them during the prefill (see `llm.LlmStage`); the first `Result` comes after the prefill.

`stream` yields a `Result` after selection and after every generated token, and a final one with
`done=True`; `run` returns that final one.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NotRequired, TypedDict

import torch
from PIL import Image

from backends import prompt_clip, real_architecture, stored_config
from backends.geometry import Prepared
from backends.signals import FEATURES, HIDDEN_FEATURE, MERGED_AFTER, ROWS, prompted

from ..core import Budget, ExplorerError, Geometry, Method, Selection, Signals
from ..methods import make, unavailable
from .clips import by_frame, frames_of, per_frame
from .cost import (
    Encoder,
    FirstPass,
    Shape,
    VisionPass,
    first_pass_flops,
    footprint,
    kv_bytes,
    prefill_flops,
    vision_flops,
)
from .images import load_image
from .llm import LlmStage, last_count, llm_hooks
from .measure import PeakMemory, TokenStream, first_forward, now, sync
from .video import Clip

MAX_PROMPT_CHARS = 20_000  # far beyond any model's context; refused before tokenizing
_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> lock: one run at a time per model


class Tokens(TypedDict):
    """A run's token counts, as `--json` prints them."""

    visual_full: int  # N: the image's visual tokens, unreduced
    visual_budget: int | None  # B; None when the method picks its own count or keeps everything
    visual_kept: int  # what reached the LLM (inside the LLM: what is left after the last cut)
    text: int  # prompt tokens that are not visual tokens
    adaptive: bool
    visual_per_layer: list[int]  # visual tokens each LLM layer sees in the prefill
    visual_layer_mean: float
    visual_cached_per_layer: list[int]  # visual tokens each layer's KV cache holds while decoding
    llm_cuts: list[dict]  # inside the LLM: {layer, scored_at, kept} per cut
    visual_entering: NotRequired[int]  # inside the LLM: the visual tokens that entered it
    visual_attended_per_step: NotRequired[list[int]]  # DyCoke: visual tokens attended to at each decode step
    generated: int
    by_partition: list[dict]  # {name, full, kept} per partition
    by_frame: NotRequired[list[dict]]  # a clip's: {frames, time_s, full, kept} per frame or temporal group


class Timing(TypedDict):
    """A run's times in seconds (`decode_tokens_per_s` a rate), as `--json` prints them."""

    ttft_s: float | None
    prefill_s: float | None
    decode_tokens_per_s: float | None
    total_s: float
    preprocess_s: float
    vision_s: float
    selection_s: float


class Cost(TypedDict):
    """A run's computed cost, as `--json` prints it."""

    prefill_flops: int  # the LLM's prefill
    kv_bytes: int  # the prompt's KV cache while decoding
    vision_flops: int  # the vision stage: encoder, recomputed attention maps, projector
    vision_flops_parts: dict  # {encoder, attention_maps, projector}
    # on a random-weight model (or when asked): the same run on a real architecture (`projection`)
    projected: NotRequired[dict]


@dataclass(frozen=True)
class Result:
    model: str
    method: str
    settings: dict
    budget: Budget | None  # None when the method keeps everything
    answer: str
    answer_ids: tuple[int, ...]  # the generated token ids
    tokens: Tokens
    timing: Timing
    memory: dict  # device, peak_bytes
    cost: Cost  # computed from the config and the real counts (`costs`, `projection`), never measured
    geometry: Geometry
    selection: Selection
    random_weights: bool
    done: bool

    def to_json(self) -> dict:
        budget = None if self.budget is None else self.budget.fraction or self.budget.tokens
        fields = ("model", "method", "settings", "answer", "random_weights", "tokens", "timing", "memory", "cost")
        return {"budget": budget, **{name: getattr(self, name) for name in fields}}


@dataclass(frozen=True)
class Selected:
    """What the stages before the LLM made of one image and prompt (`select`)."""

    prepared: Prepared
    # (N, D) the projected visual tokens in LLM order (merged where the method merges); when only the kept
    # tokens were projected, only their rows are filled
    features: torch.Tensor
    selection: Selection  # for an llm-stage method: what its step before the LLM kept, else every token
    budget: int  # B: visual tokens to keep (N when the method keeps everything or picks its own count)
    clock: tuple[float, ...]  # when it started, and when preprocessing, encoding, selection, projection ended
    vision: VisionPass  # what the vision stage ran on, for its computed cost
    clip: Clip | None = None  # the video's frames, when the run is on a clip
    every: VisionPass | None = None  # the unreduced run's vision stage, where this one skipped frames (`only_kept`)

    def stages(self) -> dict:
        """Seconds of the stages before the LLM: preprocessing, the vision encoder with the projector,
        and the selection."""
        start, preprocessed, encoded, selected, projected = self.clock
        vision = encoded - preprocessed + projected - selected
        return {"preprocess_s": preprocessed - start, "vision_s": vision, "selection_s": selected - encoded}


def run(backend, image, prompt: str, method: str = "hired", budget: Budget | float = 0.2, **options) -> Result:
    """The final `Result` of `stream`."""
    return deque(stream(backend, image, prompt, method, budget, **options), maxlen=1).pop()


def stream(
    backend,
    image: str | Image.Image,
    prompt: str,
    method: str = "hired",
    budget: Budget | float = 0.2,  # a float is a fraction of the image's visual tokens
    settings: dict | None = None,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    timeout_s: float = 300.0,  # longest wait for the next token before the run is stopped
    project_to: str | None = None,  # a stored real architecture to compute the cost on (`projection`)
) -> Iterator[Result]:
    chosen, budget = method_for(backend, method, settings, budget)
    real = real_architecture(backend, project_to)
    check_request(prompt, max_new_tokens, min_new_tokens, timeout_s)
    picture = media(image)
    model, tokenizer = backend.model, backend.tokenizer
    memory = PeakMemory(backend.device)
    ids: list[int] = []  # generated so far
    times: list[float] = []  # when each arrived
    priced: dict = {}  # the computed costs by the tokens each LLM layer holds, the same for every token after the prefill

    with exclusive(backend):
        memory.reset()
        selected = select(backend, picture, prompt, chosen, budget, max_new_tokens)
        inside, hooks = llm_hooks(backend, selected.prepared, method, chosen, selected.budget, selected.selection)
        inputs = backend.generate_inputs(selected.prepared, selected.features, selected.selection.keep)
        options = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        kwargs = {**inputs, **options, "pad_token_id": tokenizer.pad_token_id}
        if chosen.rerank:  # no KV cache: every generated token reruns the whole sequence, and the method chooses again
            kwargs["use_cache"] = False
        with first_forward(model, backend.device) as prefill, hooks as record:  # record: what the hooks did, or None
            so_far = partial(result, backend, method, chosen, budget, selected, inside, record, prefill, ids, times)
            for _ in _generate(model, kwargs, timeout_s, ids, times):
                if not inside or inside.done:  # an llm-stage method has chosen once the prefill is over
                    yield so_far(memory, priced, real)
        yield so_far(memory, priced, real, done=True)


def result(
    backend,
    method: str,
    chosen: Method,
    budget: Budget | None,
    selected: Selected,
    inside: LlmStage | None,
    record,
    prefill: list[float],
    ids: list[int],
    times: list[float],
    memory: PeakMemory,
    priced: dict,
    real: str | None = None,
    done: bool = False,
) -> Result:
    """The `Result` of a run so far: `inside` the llm-stage method's run (None for others), `record` what its
    hooks did, `prefill` the start and end of the prefill, `ids` the tokens generated and `times` when;
    `real` the stored architecture its cost is also computed on (`projection`); `priced` the costs computed so
    far in this run, by the tokens each LLM layer holds."""
    selection = inside.selection() if inside else selected.selection
    tokens = _tokens(backend, selected, selection, chosen.adaptive, inside, len(ids))
    stages = selected.stages()
    timing: Timing = {
        "ttft_s": times[0] - selected.clock[0] if times else None,
        "prefill_s": prefill[1] - prefill[0] if len(prefill) == 2 else None,
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
        "total_s": now() - selected.clock[0],
        **stages,
        "selection_s": stages["selection_s"] + (record.seconds if record else 0.0),  # + the hooks' in the LLM
    }
    text = selected.prepared.text_tokens
    held = (tuple(tokens["visual_per_layer"]), tuple(tokens["visual_cached_per_layer"]))
    if held not in priced:
        prefilled, cached = [text + v for v in held[0]], [text + v for v in held[1]]
        whole = text + tokens["visual_full"]  # a first pass (GemFilter) runs on the whole prompt
        first = None if chosen.early_layer is None else FirstPass(whole, chosen.early_layer(backend.depth))
        priced[held] = costs(backend, prefilled, cached, selected.vision, first)
        priced[held] |= projection(real, selected.vision, tokens, selected.every, chosen.early_layer)
    return Result(
        model=backend.name,
        method=method,
        settings=dataclasses.asdict(chosen),
        budget=budget,
        answer=backend.tokenizer.decode(ids, skip_special_tokens=True),
        answer_ids=tuple(ids),
        tokens=tokens,
        timing=timing,
        memory={"device": backend.device.type, "peak_bytes": memory.peak()},
        cost=priced[held],
        geometry=selected.prepared.geometry,
        selection=selection,
        random_weights=backend.random_weights,
        done=done,
    )


def _tokens(backend, selected: Selected, selection: Selection, adaptive: bool, inside, generated: int) -> Tokens:
    """The token counts of a run whose LLM keeps `selection`'s tokens (after its last cut, for `inside`)."""
    g, keep, b = selected.prepared.geometry, selection.keep, selected.budget
    kept = torch.bincount(g.partition[keep.cpu()], minlength=len(g.names)).tolist()
    by_partition = [{"name": n, "full": f, "kept": k} for n, f, k in zip(g.names, g.sizes(), kept)]
    tokens = {
        "visual_full": len(g),
        "visual_budget": b,
        "visual_kept": len(keep),
        "text": selected.prepared.text_tokens,
    }
    tokens.update(visual_budget=None if adaptive else b, adaptive=adaptive)
    every = {"visual_per_layer": [len(keep)] * backend.depth, "visual_layer_mean": float(len(keep))}
    every["visual_cached_per_layer"] = every["visual_per_layer"]
    tokens.update(inside.tokens() if inside else {**every, "llm_cuts": []})
    tokens.update(generated=generated, by_partition=by_partition)
    return tokens | ({"by_frame": by_frame(g, keep.cpu(), selected.clip)} if selected.clip else {})


@dataclass(frozen=True)
class Batch:
    """One batched run: several images answered in one generate() call."""

    answers: list[str]
    # per image: visual_full, visual_budget, visual_kept, visual_per_layer, visual_cached_per_layer, text
    tokens: list[dict]
    timing: dict  # seconds: ttft_s, prefill_s, total_s, vision_s, selection_s; decode_tokens_per_s, images_per_s
    memory: dict  # device, peak_bytes
    cost: dict  # prefill_flops, kv_bytes of the whole batch, padding included; vision_flops of every image


def run_batch(
    backend,
    images: list,
    prompt: str,
    method: str = "hired",
    budgets: Budget | float | list = 0.2,  # one for every image, or one per image
    settings: dict | None = None,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
) -> Batch:
    """Answer `prompt` about every image in one generate() call, each image with its own budget: the
    throughput of a server that batches requests. The images are encoded and their tokens selected
    one after another; then the LLM runs on all the prompts at once, left-padded to the longest.
    Methods that prune inside the LLM run one image at a time, so they are refused here."""
    budgets = budgets if isinstance(budgets, list) else [budgets] * len(images)
    if not images or len(budgets) != len(images):
        raise ExplorerError(f"a batch needs one budget per image: got {len(images)} images and {len(budgets)} budgets")
    chosen, _ = method_for(backend, method, settings, budgets[0])
    if chosen.stage != "vision":
        raise ExplorerError(f"{method} prunes inside the LLM, which runs one image at a time, not in batches")
    check_request(prompt, max_new_tokens, min_new_tokens)
    pictures = [load_image(image) for image in images]
    device, model, tokenizer = backend.device, backend.model, backend.tokenizer
    memory = PeakMemory(device)
    with exclusive(backend):
        memory.reset()
        start, stages, each, tokens, works = now(), [], [], [], []
        for picture, budget in zip(pictures, budgets):
            _, budget = method_for(backend, method, settings, budget)
            selected = select(backend, picture, prompt, chosen, budget, max_new_tokens)
            stages.append(selected.stages())
            works.append(selected.vision)
            each.append(backend.generate_inputs(selected.prepared, selected.features, selected.selection.keep))
            tokens.append(_batch_tokens(selected, backend.depth))
        inputs = backend.batch_inputs(each)
        stamps = TokenStream()
        options = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        with first_forward(model, device) as prefill:
            out = model.generate(**inputs, **options, pad_token_id=tokenizer.pad_token_id, streamer=stamps)
        sync(device)
        end = now()
    times = [at for kind, _, at in list(stamps.events.queue) if kind == "token"]  # one per step, for every image
    answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    timing = {
        "ttft_s": times[0] - start,
        "prefill_s": prefill[1] - prefill[0],
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,  # per image
        "total_s": end - start,
        "preprocess_s": sum(s["preprocess_s"] for s in stages),
        "vision_s": sum(s["vision_s"] for s in stages),
        "selection_s": sum(s["selection_s"] for s in stages),
        "images_per_s": len(images) / (end - start),
    }
    each_row = costs(backend, [inputs["input_ids"].shape[1]] * backend.depth)  # every row is padded to the longest
    cost = {key: len(images) * value for key, value in each_row.items()}  # and the vision stage of every image:
    cost |= {"vision_flops": sum(vision_flops(Encoder.of(model.config), work).total for work in works)}
    cost |= _first_passes(backend, chosen, tokens, cost["prefill_flops"])
    return Batch(answers, tokens, timing, {"device": device.type, "peak_bytes": memory.peak()}, cost)


def _first_passes(backend, chosen: Method, tokens: list[dict], prefill: int) -> dict:
    """A batch's cost of each image's first pass through the LLM (GemFilter), added to its prefill's FLOPs;
    nothing for a method without one. `tokens`: each image's counts (`_batch_tokens`)."""
    if chosen.early_layer is None:
        return {}
    shape, layer = Shape.of(backend.model.config), chosen.early_layer(backend.depth)
    first = sum(first_pass_flops(shape, FirstPass(t["text"] + t["visual_full"], layer)) for t in tokens)
    return {"first_pass_flops": first, "prefill_flops": prefill + first}


def _batch_tokens(selected: Selected, depth: int) -> dict:
    """One image's token counts in a batch: every LLM layer sees the kept tokens."""
    kept = len(selected.selection.keep)
    counts = {"visual_full": len(selected.prepared.geometry), "visual_budget": selected.budget, "visual_kept": kept}
    every = {"visual_per_layer": [kept] * depth, "visual_cached_per_layer": [kept] * depth}
    return counts | every | {"text": selected.prepared.text_tokens}


def costs(
    backend,
    tokens: list[int],
    cached: list[int] | None = None,
    vision: VisionPass | None = None,
    first: FirstPass | None = None,
) -> dict:
    """The prefill's FLOPs when LLM layer l holds tokens[l] tokens, and the bytes of the prompt's KV cache
    the decode works on, when layer l's cache holds cached[l] (the same unless the method cuts the caches
    after the prefill; see `cost`); with `vision`, the FLOPs of the vision stage that ran on it; with
    `first`, the method's first pass through the LLM (GemFilter) counted in the prefill's FLOPs, and apart."""
    config = backend.model.config
    shape = Shape.of(config)
    cost = {
        "prefill_flops": prefill_flops(shape, tokens),
        "kv_bytes": kv_bytes(shape, tokens if cached is None else cached, backend.model.dtype.itemsize),
    }
    if first is not None:
        cost["first_pass_flops"] = first_pass_flops(shape, first)
        cost["prefill_flops"] += cost["first_pass_flops"]
    if vision is not None:
        flops = vision_flops(Encoder.of(config), vision)
        parts = {"encoder": flops.encoder, "attention_maps": flops.maps, "projector": flops.projector}
        cost |= {"vision_flops": flops.total, "vision_flops_parts": parts}
    return cost


def projection(
    model: str | None,
    vision: VisionPass,
    tokens: Tokens,
    every: VisionPass | None = None,
    early_layer: Callable[[int], int] | None = None,
) -> dict:
    """{"projected": ...}: the computed `cost.Footprint` of this run on the stored architecture of the real
    checkpoint `model` (nothing when None), in bf16 as published, reduced and full (the unreduced run: the
    encoder and projector on every token, every visual token in every layer). The token counts are this
    run's, which are the real checkpoint's where the processor geometry is (as for the tiny-* models); the
    widths and depths are the real config's; `every`, the unreduced run's vision stage where it differs;
    `early_layer`, the method's first pass through the LLM (GemFilter), at the real depth."""
    if model is None:
        return {}
    config, text, bf16 = stored_config(model), tokens["text"], 2
    prefill = [text + v for v in tokens["visual_per_layer"]]
    cached = [text + v for v in tokens["visual_cached_per_layer"]]
    reduced = footprint(config, vision, prefill, cached, bf16, early_layer, text + tokens["visual_full"])
    whole = [text + tokens["visual_full"]]
    full = footprint(config, every or VisionPass(vision.sequences, vision.windows), whole, whole, bf16)
    reduced, full = dataclasses.asdict(reduced), dataclasses.asdict(full)
    return {"projected": {"model": model, "dtype": "bfloat16", "reduced": reduced, "full": full}}


def method_for(backend, name: str, settings: dict | None, budget: Budget | float) -> tuple[Method, Budget | None]:
    """The method with its settings, and its budget: None when it keeps everything or picks its own count.
    A method that cannot run on the backend's model is refused, with the reason."""
    chosen = make(name, **(settings or {}))
    if reason := unavailable(name, backend, clip=True):  # what an image or a clip lacks: `check_media`
        raise ExplorerError(reason)
    budget = budget if isinstance(budget, Budget) else Budget(fraction=budget)
    return chosen, budget if chosen.budgeted and not chosen.adaptive else None  # adaptive: no budget to meet


def select(backend, picture, prompt: str, chosen: Method, budget: Budget | None, max_new_tokens: int) -> Selected:
    """Preprocess, vision stage, selection, and the projector on the kept tokens when that is how the
    family runs (else it ran with the encoder), each stage timed."""
    device = backend.device
    clock = [now()]
    is_video = isinstance(picture, Clip)
    with torch.inference_mode():
        prepared = prepare(backend, picture, prompt)
        g = prepared.geometry
        plan = plan_for(backend, prepared, chosen, budget)
        entering = plan.budget if plan.vision and chosen.early_layer is None else len(g)
        _check_length(backend, prepared, entering, max_new_tokens)
        sync(device)
        clock.append(now())
        merging = chosen.merging(g, plan.budget) if plan.lazy and chosen.merging is not None else None
        if is_video and plan.vision and not (plan.needs or plan.prompted or chosen.early_layer):
            return only_kept(backend, picture, prompt, prepared, chosen, plan, clock)
        features, maps = backend.encode(prepared, plan.needs, project=not plan.lazy, merging=merging)
        sync(device)
        clock.append(now())
        if plan.prompted:  # a CLIP model reads the prompt and the frames, the method's own time
            maps |= prompt_signals(backend, picture, prompt, g, plan.prompted)
        if chosen.early_layer is not None:  # a first pass through the LLM's first layers, the method's own time
            maps |= backend.early_pass(prepared, features, chosen.early_layer(backend.depth))
        selection = choose(chosen, Signals(g, plan.step, maps))
        if selection.weights is not None and selection.mixes == "features":  # merged after the projector
            features = mixed_features(features, selection)
        elif selection.weights is not None and not plan.lazy:  # the backend projects each kept token's mix
            features = backend.merge(features, maps, selection)
        sync(device)
        clock.append(now())
        if plan.lazy:  # the projector, on the kept tokens (and the merges) alone
            features = backend.kept_features(maps, selection)
            sync(device)
        clock.append(now())
    keep = selection.keep
    assert keep.dim() == 1 and (keep.diff() > 0).all() and 0 <= keep.min() and keep.max() < len(g), "bad keep"
    work = vision_pass(backend, prepared, plan, selection, maps.get(MERGED_AFTER) if merging else None)
    return Selected(prepared, features, selection, plan.budget, tuple(clock), work, picture if is_video else None)


def only_kept(
    backend, clip: Clip, prompt: str, prepared: Prepared, chosen: Method, plan: Plan, clock: list
) -> Selected:
    """`select` on a clip for a method that reads no signal (`frames`, `uniform`, `random`): it chooses first,
    then only the frames (or temporal groups) holding a kept token go through the video processor, the
    encoder and the projector, as a run on fewer frames would; the others' rows stay zero, never read. The
    same features as encoding every frame where the family sizes each frame on its own; where it sizes them
    by the clip's length (Qwen3-VL), every frame is encoded, as for any method. The clock keeps each
    stage's length: the selection, then the vision stage, in the order `stages` reads them."""
    g, device = prepared.geometry, backend.device
    selection = choose(chosen, Signals(g, plan.step, {}))
    chosen_at = now()
    parts = sorted(set(g.partition[selection.keep].tolist()) & set(g.frames))  # (F',) frames holding kept tokens
    shown = [i for p in parts for i in frames_of(g.names[p])]  # their frames, in the clip
    times = [clip.times_s[i] for i in shown]
    encoded = backend.prepare_video([clip.frames[i] for i in shown], prompt, times, clip.duration_s)
    h = encoded.geometry
    if [len(h.members(q)) for q in h.frames] == [len(g.members(p)) for p in parts]:
        out = backend.image_features(encoded)  # (M, D): the kept frames' tokens, then those of no frame
        features = out.new_zeros(len(g), out.shape[1])
        rows = torch.cat([g.members(p) for p in parts] + [g.outside_frames()])  # (M,) theirs in the clip
        features[rows.to(out.device)] = out[torch.cat([h.members(q) for q in h.frames] + [h.outside_frames()])]
    else:  # the frames are sized by how many there are: every frame, as a run on the whole clip
        encoded, (features, _) = prepared, backend.encode(prepared, ())
    sync(device)
    vision, choosing = now() - chosen_at, chosen_at - clock[-1]
    clock += [clock[-1] + vision, clock[-1] + vision + choosing, clock[-1] + vision + choosing]
    work = vision_pass(backend, encoded, plan, selection, None)
    every = vision_pass(backend, prepared, plan, Selection(keep=torch.arange(len(g))), None)
    return Selected(prepared, features, selection, plan.budget, tuple(clock), work, clip, every)


def mixed_features(features: torch.Tensor, selection: Selection) -> torch.Tensor:
    """(N, D) features in which kept token keep[k] carries sum_j weights[k, j] * features_j, the mix of
    projected features a method that merges after the projector asks for (`Selection.mixes`)."""
    weights = selection.weights.to(device=features.device, dtype=torch.float32)  # sparse (K, N)
    merged = features.clone()
    merged[selection.keep.to(features.device)] = (weights @ features.float()).to(features.dtype)  # (K, D)
    return merged


def vision_pass(
    backend, prepared: Prepared, plan: Plan, selection: Selection, merged_after: torch.Tensor | None
) -> VisionPass:
    """What `select`'s vision stage ran on: the encoder on every crop, on fewer tokens block after block where
    a method merges inside it (`merged_after`, its (N,) MERGED_AFTER signal: the block after which each
    token was folded away, NaN never), the attention maps of the signals it captured (none when it merges),
    and the projector on every token, or on the kept ones but newlines (`lazy`), plus once more on each
    kept token that absorbs others (`Backend.merge`)."""
    g = prepared.geometry
    merging = merged_after is not None
    maps = () if merging else tuple(name for name in plan.needs if name not in (FEATURES, ROWS))
    projected, merged = None, 0
    if plan.lazy:
        newline = g.names.index("newline") if "newline" in g.names else -1
        projected = int((g.partition[selection.keep.cpu()] != newline).sum())
    elif selection.weights is not None and selection.mixes == "hidden":
        merged = int(backend.mixing(selection).sum())
    sequences, windows = backend.encoder_sequences(prepared), backend.encoder_windows(prepared)
    counted = merges_by_crop(prepared.source, merged_after, sequences) if merging else {}
    return VisionPass(tuple(sequences), tuple(windows), projected, maps, merged, **counted)


def merges_by_crop(source: torch.Tensor, merged_after: torch.Tensor, sequences: list[int]) -> dict:
    """`VisionPass.merges` and `mergeable` of a pass that merged inside the encoder, from `source` (N,),
    each token's row in the flat encoder output (-1 for newlines), the crops `sequences` (as many patches
    each) and the (N,) MERGED_AFTER signal: per crop, the tokens folded away after each block, and those
    that may merge (the ones that reach the LLM: [CLS] and padding never merge)."""
    real = source.cpu() >= 0
    crop = source.cpu()[real] // sequences[0]  # (N',) the crop of each token that reaches the LLM
    block = merged_after.cpu()[real]  # (N',) float, NaN never folded away
    folded = ~block.isnan()
    merges = torch.zeros(len(sequences), int(block[folded].max()) + 1 if folded.any() else 0, dtype=torch.long)
    ones = torch.ones(int(folded.sum()), dtype=torch.long)
    merges.index_put_((crop[folded], block[folded].long()), ones, accumulate=True)  # (crops, blocks)
    mergeable = torch.bincount(crop, minlength=len(sequences))  # (crops,)
    return {"merges": tuple(map(tuple, merges.tolist())), "mergeable": tuple(mergeable.tolist())}


@dataclass(frozen=True)
class Plan:
    """How `select` runs a method on one prepared image."""

    budget: int  # B: visual tokens to keep (N when the method keeps everything or picks its own count)
    step: int  # what the method's step before the LLM keeps (see `step_budget`)
    vision: bool  # the method selects before the LLM (else every visual token enters it, to be cut inside)
    lazy: bool  # only the kept tokens are projected (the family can, and the method reads no projected features)
    needs: tuple[str, ...]  # the signals the vision pass captures
    prompted: tuple[str, ...] = ()  # the signals a CLIP model reads off the prompt and a clip's frames


def media(image) -> Image.Image | Clip:
    """What a run is on: a `Clip` as it is (`video.load_video`), else an image, loaded and checked."""
    return image if isinstance(image, Clip) else load_image(image)


def prepare(backend, picture: Image.Image | Clip, prompt: str) -> Prepared:
    """The prompt and the image, or the clip's frames, through the model's processor, with their geometry."""
    if isinstance(picture, Clip):
        return backend.prepare_video(picture.frames, prompt, picture.times_s, picture.duration_s)
    return backend.prepare(picture, prompt)


def plan_for(backend, prepared: Prepared, chosen: Method, budget: Budget | None) -> Plan:
    """The budget in tokens, and what the vision pass must give for it; a method that merges inside the
    encoder of an image whose tokens are not one patch each is refused, with the reason."""
    g = prepared.geometry
    check_media(chosen, g)
    b = budget.resolve(len(g)) if budget else len(g)
    vision = chosen.stage == "vision"
    lazy = vision and backend.one_patch_each(prepared) and b < len(g) and FEATURES not in chosen.needs
    if chosen.merging is not None and not lazy and b < len(g):
        raise ExplorerError(
            f"{backend.family} resamples the grid of an image this large, so its visual tokens are not one "
            "encoder patch each and patches cannot be merged inside the encoder for them; try a smaller "
            "image, or tome, which merges after the encoder"
        )
    wanted = vision_needs(chosen)
    needs = (*(name for name in wanted if not prompted(name)), *([HIDDEN_FEATURE] * lazy))
    step = step_budget(chosen, backend.depth, len(g), b if budget else None)
    return Plan(b, step, vision, lazy, tuple(dict.fromkeys(needs)), tuple(filter(prompted, wanted)))


def prompt_signals(backend, clip: Clip, prompt: str, g: Geometry, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The signals `names` a CLIP model reads off the prompt and the clip's frames (`backends.prompt_clip`)."""
    shown = [frames_of(name) for name in g.names]  # the frames each partition shows
    return prompt_clip.signals(names, clip.frames, prompt, g, shown, backend.device, backend.model.dtype)


def check_media(chosen: Method, g: Geometry) -> None:
    """Refuse a method what the image or clip does not have for it, with the reason."""
    name = type(chosen).__name__
    if "clip" in chosen.requires and not g.frames:
        raise ExplorerError(f"{name} works on the frames of a video: give it a clip, not an image")
    if g.frames and "thumbnail" in chosen.requires:
        raise ExplorerError(f"{name} needs a thumbnail of the whole image beside its crops; a clip's frames have none")
    if g.frames and chosen.merging is not None:
        raise ExplorerError(
            f"{name} merges patches inside the vision encoder, and a clip's visual tokens are pooled from several "
            "encoder patches each; try tome, which merges after the encoder"
        )


def vision_needs(chosen: Method) -> tuple[str, ...]:
    """The vision signals the method's step before the LLM reads: a vision method's `needs`, an llm-stage
    method's `vision_needs` (empty when it has no such step)."""
    return chosen.needs if chosen.stage == "vision" else chosen.vision_needs


def choose(chosen: Method, signals: Signals) -> Selection:
    """The method's selection before the LLM on the vision signals: a vision method's `select`, an llm-stage
    method's `select_vision`, or every token when it has no step before the LLM."""
    first = chosen.select if chosen.stage == "vision" else chosen.select_vision
    if first is None:
        return Selection(keep=torch.arange(len(signals.geometry)))
    if chosen.on_clips == "per frame" and signals.geometry.frames:
        return per_frame(first, signals)
    return first(signals)


def step_budget(chosen: Method, depth: int, n: int, budget: int | None) -> int:
    """What the method's step before the LLM keeps of the n visual tokens for budget B (None: all n): B
    for a vision method or one that counts B after its cuts; for an llm-stage method whose B is a layer
    mean, what its last cut would leave (1 when no count meets B; `llm.LlmStage` then says why)."""
    if budget is None:
        return n
    if chosen.stage == "vision" or chosen.budget_after_cuts:
        return budget
    return last_count(chosen, depth, n, budget) or 1


def _check_length(backend, prepared: Prepared, entering: int, max_new_tokens: int) -> None:
    """Refuse a prompt whose visual tokens entering the LLM and answer would not fit the model's positions."""
    if prepared.text_tokens + entering + max_new_tokens > backend.max_positions:
        raise ExplorerError(
            f"prompt ({prepared.text_tokens} tokens) + {entering} visual tokens + {max_new_tokens} new tokens "
            f"exceeds the model's {backend.max_positions} positions; shorten the prompt or the budget"
        )


def model_lock(model) -> threading.Lock:
    """The lock that lets one run at a time use `model`."""
    return _locks.setdefault(model, threading.Lock())


@contextmanager
def exclusive(backend):
    """The backend's model for this run alone; a device out-of-memory error becomes `OutOfMemory`, after
    the memory is given back."""
    with model_lock(backend.model), _out_of_memory(backend.device):
        yield


def _generate(model, kwargs: dict, timeout_s: float, ids: list[int], times: list[float]) -> Iterator[None]:
    """model.generate(**kwargs) in a worker thread; yields once at the start and after each new token
    (appended to `ids`, its arrival time to `times`). Errors in the worker are raised here."""
    tokens = TokenStream()

    def work():
        try:
            model.generate(**kwargs, streamer=tokens)
        except BaseException as error:  # handed to the caller's thread, which raises it
            tokens.events.put(("error", error, now()))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        yield
        while True:
            try:
                kind, value, at = tokens.events.get(timeout=timeout_s)
            except queue.Empty:
                raise ExplorerError(f"generation stalled: no token for {timeout_s:g} s, so it was stopped") from None
            if kind == "error":
                raise value
            if kind == "end":
                return
            ids.append(value)
            times.append(at)
            yield
    finally:
        tokens.stop.set()  # a generate() still running stops at its next token
        worker.join(timeout=timeout_s)


def check_request(prompt, max_new_tokens: int = 64, min_new_tokens: int = 0, timeout_s: float = 300.0) -> None:
    """The checks on a request that need no model."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ExplorerError("the prompt is empty: ask something about the image")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ExplorerError(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are taken")
    if not 1 <= max_new_tokens <= 4096 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ExplorerError(
            f"max_new_tokens must be 1..4096 and min_new_tokens 0..it, got {max_new_tokens}, {min_new_tokens}"
        )
    if not timeout_s > 0:
        raise ExplorerError(f"the timeout must be a positive number of seconds, got {timeout_s}")


class OutOfMemory(ExplorerError):
    """The device ran out of memory during a run (and got it back)."""


@contextmanager
def _out_of_memory(device: torch.device):
    """Turns a device out-of-memory error into a clear message, after giving the memory back."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of memory on {device}; try a smaller budget, image or model") from None
