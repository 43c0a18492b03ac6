"""What every backend shares: the user-facing error, token geometry, device choice, signal hooks, and
`Backend`, the surface every model family implements (one subclass per family, one file each)."""

from __future__ import annotations

import functools
import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers  # lazy: its model code loads on first use, not when this file is imported


class ExplorerError(Exception):
    """A problem the user can fix (bad image, budget, model, ...), reported as one clear message."""


@dataclass(frozen=True)
class Geometry:
    """Where each of the N visual tokens of one image sits, in the order the LLM reads them.

    Every partition except "newline" is a full rectangle of cells listed in raster order, so its
    tokens, sorted by LLM index, walk its grid row by row.
    """

    names: tuple[str, ...]  # partition names: "base", "crop R,C", ..., "newline"; "image"; "tile R,C", "global"
    partition: torch.Tensor  # (N,) long, index into `names`
    cells: torch.Tensor  # (N, 2) long, (row, col) in the partition's grid; newline i is (i, 0)
    boxes: torch.Tensor  # (N, 4) float, (x0, y0, x1, y1) on the original image; NaN for newlines
    image_size: tuple[int, int]  # (width, height) of the original image

    def __len__(self) -> int:
        return len(self.partition)

    def members(self, p: int) -> torch.Tensor:
        """(M,) sorted indices of partition p's tokens."""
        return (self.partition == p).nonzero()[:, 0]

    def sizes(self) -> list[int]:
        return torch.bincount(self.partition, minlength=len(self.names)).tolist()

    def grid(self, p: int) -> tuple[int, int]:
        """(rows, cols) of partition p's rectangle, (0, 0) when it is empty."""
        cells = self.cells[self.partition == p]
        if len(cells) == 0:
            return 0, 0
        rows, cols = (cells.amax(0) - cells.amin(0) + 1).tolist()
        return rows, cols

    @property
    def thumbnail(self) -> int | None:
        """The partition that shows the whole image at low resolution beside high-resolution crops:
        "base" (LLaVA-NeXT, OneVision) or "global" (SmolVLM); None for models that see the image once."""
        return next((p for p, name in enumerate(self.names) if name in ("base", "global")), None)

    @property
    def crops(self) -> list[int]:
        """The partitions that each show a part of the image at high resolution: "crop R,C" or "tile R,C"."""
        return [p for p, name in enumerate(self.names) if name.startswith(("crop ", "tile "))]


@dataclass(frozen=True)
class Prepared:
    """One image and prompt, ready for the model."""

    inputs: dict  # the processor's tensors, on the model's device
    geometry: Geometry
    # (N,) long: each visual token's row in the flat (crops * patches) encoder output, -1 for a token that has
    # no single row (newlines; tokens folded or resampled from several patches)
    source: torch.Tensor
    text_tokens: int  # prompt tokens that are not visual tokens


def pick_device(device: str | None = None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


ATTENTION = ("cls", "cls-heads", "cls-onehead", "cls-logits")  # signal kinds recomputed from a layer's q/k
KINDS = (*ATTENTION, "keys", "hidden")  # what the encoder hooks capture
CHUNK = 1 << 24  # attention scores materialised at once when the received attention is summed


def attention_maps(q: torch.Tensor, k: torch.Tensor, kinds: set[str], scale: float, cls: bool) -> dict:
    """The attention kinds asked of one layer, recomputed from its queries and keys.

    q, k: (B, T, heads, head_dim) float32, B independent sequences (crops, windows) of T tokens.
    With a [CLS] token (the first of T; q may hold its row alone): "cls" is its attention to the
    T-1 patches, heads summed; "cls-heads" the same per head; "cls-onehead" the same with the heads
    joined into one head over all channels, scaled by 1/sqrt(channels) (PruMerge's); "cls-logits"
    its row of q.k * scale before the softmax, heads averaged (GlobalCom2's). (B, T-1) each, (B, T-1,
    heads) for cls-heads.
    Without one (SigLIP, the Qwen ViT), as community ports do, the attention each token receives:
    "cls" is the mean over heads and queries of its column of softmax(q.k * scale); "cls-heads"
    the mean over queries, per head; "cls-onehead" the mean over queries with the heads joined into
    one; "cls-logits" the mean over heads and queries of q.k * scale, before the softmax. (B, T)
    each, (B, T, heads) for cls-heads.
    """
    out = {}
    b, t, h, d = k.shape
    if "cls-onehead" in kinds:
        joined = _attention(q.reshape(b, -1, 1, h * d), k.reshape(b, t, 1, h * d), (h * d) ** -0.5, cls)
        out["cls-onehead"] = joined[:, 0]
    if kinds & {"cls", "cls-heads"}:
        weights = _attention(q, k, scale, cls)  # (B, h, T')
        out["cls"] = weights.sum(1) if cls else weights.mean(1)
        out["cls-heads"] = weights.transpose(1, 2)  # (B, T', h)
    if "cls-logits" in kinds:
        rows = q[:, :1] if cls else q.mean(1, keepdim=True)  # (B, 1, h, d): mean of q.k over queries = (mean q).k
        logits = torch.einsum("bqhd,bthd->bht", rows, k) * scale  # (B, h, T)
        out["cls-logits"] = logits.mean(1)[:, 1:] if cls else logits.mean(1)
    return {kind: out[kind] for kind in kinds if kind in out}


def _attention(q: torch.Tensor, k: torch.Tensor, scale: float, cls: bool) -> torch.Tensor:
    """(B, h, T-1): the [CLS] row of the softmax attention per head; or, without [CLS], (B, h, T): the
    attention each token receives, per head, averaged over the queries, CHUNK scores at a time."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, T_q, d), (B, h, T, d)
    if cls:
        return torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * scale, -1)[:, :, 0, 1:]
    b, h, t, _ = k.shape
    total = k.new_zeros(b, h, t)
    step = max(1, CHUNK // (b * h * t))
    for start in range(0, q.shape[2], step):
        total += torch.softmax(q[:, :, start : start + step] @ k.transpose(-1, -2) * scale, -1).sum(2)
    return total / q.shape[2]


@contextmanager
def encoder_signals(layers: torch.nn.ModuleList, wants: dict[int, set[str]], cls: bool = True):
    """Capture what methods read from chosen layers of a CLIP or SigLIP encoder during one forward pass.

    `wants` maps a layer to the kinds asked of it: the attention kinds of `attention_maps`, "keys"
    (the layer's key projections) and "hidden" (the layer's output). Attention is recomputed from
    the layer's own q/k projections (hooks on q_proj and k_proj), so the encoder keeps running its
    fast attention kernel. `cls`: whether the first token of each crop is a [CLS] token, which is
    then left out of every signal. Yields a dict filled during the forward pass: (kind, layer) ->
    float32 (crops, T', ...), T' the patches: (crops, T') for attention, (crops, T', heads, head_dim)
    for keys and (crops, T', channels) for hidden, nothing renormalised.
    """
    out: dict[tuple[str, int], torch.Tensor] = {}
    queries: dict[int, torch.Tensor] = {}
    first = 1 if cls else 0

    def on_q(layer):
        def hook(module, args, q):  # q: (crops, T, D)
            queries[layer] = q[:, :1] if cls else q  # [CLS] needs its own row only

        return hook

    def on_k(layer, kinds):
        attn = layers[layer].self_attn

        def hook(module, args, k):  # k: (crops, T, D)
            k = k.unflatten(-1, (attn.num_heads, attn.head_dim)).float()  # (crops, T, h, d)
            if "keys" in kinds:
                out["keys", layer] = k[:, first:]
            if layer in queries:
                q = queries.pop(layer).unflatten(-1, (attn.num_heads, attn.head_dim)).float()
                maps = attention_maps(q, k, kinds, attn.scale, cls)
                out.update({(kind, layer): m for kind, m in maps.items()})

        return hook

    def on_output(layer):
        def hook(module, args, hidden):  # hidden: (crops, T, C)
            out["hidden", layer] = hidden[:, first:].float()

        return hook

    handles = []
    try:
        for layer, kinds in sorted(wants.items()):
            attention = layers[layer].self_attn
            if kinds & set(ATTENTION):
                handles.append(attention.q_proj.register_forward_hook(on_q(layer)))
            if kinds & {*ATTENTION, "keys"}:
                handles.append(attention.k_proj.register_forward_hook(on_k(layer, kinds)))
            if "hidden" in kinds:
                handles.append(layers[layer].register_forward_hook(on_output(layer)))
        yield out
    finally:
        for handle in handles:
            handle.remove()


class Backend:
    """One loaded model of a family: its processor, the geometry of its visual tokens, its vision
    stage with the signals methods read, and the prompt with only the kept tokens.

    A family sets the class attributes and fills in `layout`, `image_features`, `tokens_of` and
    `project` (and `hooks` when its encoder is not CLIP- or SigLIP-like), and sets `encoder` and
    `feature_layer` in `__init__`.
    """

    model_type: str  # config.model_type
    family: str  # its name for people
    model_class: str  # the transformers class that loads it
    default: str  # its real checkpoint on the Hub that the explorer suggests
    cls_token: bool = True  # whether the vision encoder has a [CLS] token
    thumbnail: bool = False  # whether a low-resolution view of the whole image comes beside high-resolution crops
    # whether `vision_tower` runs the encoder alone, so that only kept tokens are projected (on images
    # whose every token is one patch: `one_patch_each`)
    projects_kept: bool = False

    encoder: torch.nn.ModuleList  # the vision encoder's layers
    feature_layer: int  # the layer whose output the LLM receives

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        self.model, self.processor, self.name, self.random_weights = model, processor, name, random_weights
        self.max_positions = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str, device: torch.device, name: str, random_weights=False, **hub) -> Backend:
        processor = cls.load_processor(path, **hub)
        # accelerate spreads the model over the GPUs, then CPU, when it does not fit one device
        placement = {"device_map": "auto"} if device.type == "cuda" else {}
        model = getattr(transformers, cls.model_class).from_pretrained(
            path, dtype=pick_dtype(device), **placement, **hub
        )
        return cls(model.to(device) if not placement else model, processor, name, random_weights)

    @classmethod
    def load_processor(cls, path: str, **hub):
        return transformers.AutoProcessor.from_pretrained(path, **hub)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def prepare(self, image, prompt: str) -> Prepared:
        """Chat template + processor on one PIL image, and the geometry of its visual tokens."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if self.processor.chat_template:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = f"{self.processor.image_token}\n{prompt}"
        inputs = self.processor(images=image, text=text, return_tensors="pt", **self.image_options()).to(self.device)
        geometry, source = self.layout([image.height, image.width])
        n_image = int((inputs["input_ids"] == self.image_token_id).sum())
        assert n_image == len(geometry), f"processor inserted {n_image} image tokens, geometry has {len(geometry)}"
        return Prepared(inputs, geometry, source, inputs["input_ids"].shape[1] - n_image)

    def image_options(self) -> dict:
        """Keyword arguments for the processor's image processing (Qwen2-VL: the pixel cap)."""
        return {}

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels, and each token's row in the flat encoder output."""
        raise NotImplementedError

    def encode(
        self, prepared: Prepared, needs: tuple[str, ...], project: bool = True, merging=None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the vision stage: (N, D) projected features in LLM order, and the signals asked for
        (see `explorer.Signals`): the (N,) rows on the CPU, the rest on the model's device. With
        `project=False` (families that `projects_kept`) only the encoder runs and the features are
        None: `kept_features` projects the tokens kept, from the "hidden@feature" signal. With a
        `merging` plan (`encoder_merge.Merging`, families that `projects_kept`) the encoder merges
        tokens as it runs and gives only the signals of `merged`."""
        if merging is not None:
            if set(needs) - {"hidden@feature"}:
                raise ExplorerError("a method that merges inside the vision encoder reads only what the merging gives")
            return None, self.merged(prepared, merging)
        asked = {name: self.signal(name) for name in needs if name != "features"}  # name -> (kind, layer)
        wants: dict[int, set[str]] = {}
        for kind, layer in asked.values():
            wants.setdefault(layer, set()).add(kind)
        with self.hooks(prepared, wants) as captured:
            features = self.image_features(prepared) if project else self.vision_tower(self.crops(prepared))
        signals = {"features": features} if "features" in needs else {}
        for name, (kind, layer) in asked.items():
            rows = self.tokens_of(prepared, captured[kind, layer], fold="concat" if kind == "hidden" else "mean")
            signals[name] = rows.cpu() if rows.dim() == 1 else rows
        return features, signals

    @property
    def vision_layers(self) -> int:
        """The vision encoder's number of layers."""
        return len(self.encoder)

    def hooks(self, prepared: Prepared, wants: dict[int, set[str]]):
        """A context manager that captures the signals of the chosen layers during the vision stage."""
        return encoder_signals(self.encoder, wants, cls=self.cls_token)

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        """(N, D) the projected visual tokens the LLM receives, in LLM order."""
        raise NotImplementedError

    def one_patch_each(self, prepared: Prepared) -> bool:
        """Whether every visual token of this image but the newlines is one encoder patch, which the
        projector can take on its own (families that `projects_kept`; LLaVA-OneVision: unless it
        resampled the grid)."""
        return self.projects_kept

    def crops(self, prepared: Prepared) -> torch.Tensor:
        """(crops, 3, H, W) the images the vision encoder takes, one per crop (families that `projects_kept`)."""
        raise NotImplementedError

    def vision_tower(self, pixels: torch.Tensor) -> None:
        """Run the vision encoder alone on (crops, 3, H, W) pixels, for its hooks (families that `projects_kept`)."""
        self.model.model.vision_tower(pixels)

    def merged(self, prepared: Prepared, plan) -> dict[str, torch.Tensor]:
        """The vision encoder run with its tokens merged after every block up to the feature layer until
        each partition is down to its budget (`encoder_merge.merging`; [CLS] and the padding that
        unpadding removes are never merged); crops that merge alike (the same tokens, as many merges)
        run side by side. The signals, in LLM order:
        - "hidden@feature": (N, C) the feature layer's output of the row that holds each token, merged;
        - "merged into": (N,) the token (index into N) that began the row holding each token, NaN for newlines;
        - "merged after": (N,) the block after which a token's own row was folded into another, NaN if never."""
        from .encoder_merge import merging  # which imports this file

        source = prepared.source.to(self.device)  # (N,) rows of the flat encoder output, -1 for newlines
        pixels = self.crops(prepared)  # (crops, 3, H, W)
        side = self.model.config.vision_config.patch_size
        patches = (pixels.shape[-2] // side) * (pixels.shape[-1] // side)  # T': patches per crop
        first = 1 if self.cls_token else 0
        flat = source[source >= 0]  # the rows that reach the LLM
        mergeable = torch.zeros(len(pixels), first + patches, dtype=torch.bool, device=self.device)  # (crops, T)
        mergeable[flat // patches, first + flat % patches] = True
        partition = prepared.geometry.partition.to(self.device)
        alike: dict[tuple, list[int]] = {}  # (merges, mergeable) -> the crops
        for c, real in enumerate(mergeable):
            members = (source >= 0) & (source // patches == c)  # (N,) its tokens (none: all padding)
            budget = plan.budgets[int(partition[members][0])] if members.any() else 0
            merges = max(int(real.sum()) - max(budget, 1), 0)
            alike.setdefault((merges, tuple(real.tolist())), []).append(c)
        traces = [None] * len(pixels)
        for (merges, _), crops in alike.items():
            with merging(self.encoder, self.feature_layer, mergeable[crops], merges, plan) as done:
                self.vision_tower(pixels[crops])
            for c, trace in zip(crops, done):
                traces[c] = trace
        into = torch.cat([t.origin[t.owner][first:] - first + c * patches for c, t in enumerate(traces)])  # flat rows
        token = torch.full((len(pixels) * patches,), -1, device=self.device)  # flat row -> index into N
        token[flat] = (source >= 0).nonzero()[:, 0]
        after = torch.cat([t.merged_after[first:] for t in traces]).float()

        def rows(values: torch.Tensor) -> torch.Tensor:  # (crops * T', ...) -> (N, ...) in LLM order
            return self.tokens_of(prepared, values.view(len(pixels), patches, *values.shape[1:]), "concat")

        return {
            "hidden@feature": rows(torch.cat([t.output[t.owner][first:] for t in traces])),
            "merged into": rows(token[into].float()).cpu(),
            "merged after": rows(after.masked_fill(after < 0, math.nan)).cpu(),
        }

    def newline(self) -> torch.Tensor | None:
        """(D,) the LLM input of a newline token, for families that have them (LLaVA-NeXT's and
        LLaVA-OneVision's `image_newline`), else None."""
        return getattr(self.model.model, "image_newline", None)

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        """Per-patch values of the encoder, as `hooks` captured them, as (N, ...) rows in LLM order, NaN
        for tokens without any (newlines). A token made of several patches gets their mean (fold="mean")
        or their values side by side in the order the projector takes them (fold="concat").

        Here, for families whose every token is one patch of one crop: values (crops, T', ...) are
        picked at `Prepared.source`."""
        flat = values.flatten(0, 1)  # (crops * T', ...)
        src = prepared.source.to(flat.device)
        rows = flat[src.clamp(min=0)]  # (N, ...) in LLM order
        return rows.masked_fill((src < 0).view(-1, *[1] * (rows.dim() - 1)), math.nan)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, C) feature-layer encoder outputs, as "hidden@feature" holds them -> (K, D) LLM inputs;
        here the LLaVA projector."""
        return self.model.model.multi_modal_projector(hidden)

    def signal(self, name: str) -> tuple[str, int]:
        """(kind, layer) of a signal name such as cls@0, keys@feature or hidden@last."""
        kind, _, layer = name.partition("@")
        if kind not in KINDS or not layer:
            given = ", ".join(f"{kind}@<layer>" for kind in KINDS)
            raise ExplorerError(f"{self.family} cannot give the signal {name!r}; it gives features, {given}")
        if layer == "feature":
            return kind, self.feature_layer
        if layer.startswith("feature-") and layer[8:].isdigit():  # k layers below the feature layer
            if int(layer[8:]) > self.feature_layer:
                raise ExplorerError(
                    f"{name!r}: the feature layer is vision layer {self.feature_layer}, with "
                    f"{self.feature_layer} layers below it"
                )
            return kind, self.feature_layer - int(layer[8:])
        if layer == "last":
            return kind, len(self.encoder) - 1
        if not layer.isdigit() or int(layer) >= len(self.encoder):
            raise ExplorerError(
                f"{name!r}: the vision encoder has layers 0..{len(self.encoder) - 1}, feature, feature-<k> and last"
            )
        return kind, int(layer)

    def merge(self, features: torch.Tensor, signals: dict[str, torch.Tensor], selection) -> torch.Tensor:
        """(N, D) features in which every kept token that absorbs others carries the projection of
        its mix of encoder outputs, sum_j weights[k, j] * hidden_j (`Selection.weights`), as VisionZip
        and PruMerge merge: before the projector, whose MLP would not commute with the mean."""
        mixed, mixing = self._mixed(signals, selection)  # (K, C) or None, (K,)
        if mixed is None:
            return features
        merged = features.clone()
        projected = self.project(mixed[mixing.to(mixed.device)].to(features.dtype))  # (K', D)
        merged[selection.keep[mixing].to(merged.device)] = projected.to(merged.dtype)
        return merged

    def kept_features(self, signals: dict[str, torch.Tensor], selection) -> torch.Tensor:
        """(N, D) features of which only the kept rows are filled, as `image_features` and `merge` would
        fill them, from the encoder outputs ("hidden@feature"): the projector runs on the kept tokens
        alone (families that `projects_kept`, whose every token but the newlines is one patch)."""
        hidden = signals["hidden@feature"]  # (N, C), NaN rows for newlines
        keep = selection.keep.to(hidden.device)
        rows = hidden[keep]  # (K, C)
        mixed, mixing = self._mixed(signals, selection) if selection.weights is not None else (None, None)
        if mixed is not None:
            rows = torch.where(mixing.to(hidden.device)[:, None], mixed, rows)
        newline = rows.isnan().any(1)  # (K,)
        dtype = self.model.dtype
        projected = self.project(rows[~newline].to(dtype))  # (K', D)
        features = projected.new_zeros(len(hidden), projected.shape[1])
        features[keep[~newline]] = projected
        if newline.any():
            features[keep[newline]] = self.newline().to(features)
        return features

    def _mixed(self, signals: dict[str, torch.Tensor], selection) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(K, C) sum_j weights[k, j] * hidden_j for every kept token (zeros where it carries only
        itself), None when no token absorbs others; and (K,) bool: whether kept token k does."""
        keep, weights = selection.keep, selection.weights.coalesce()  # (K,), sparse (K, N) on the CPU
        (rows, columns), values = weights.indices(), weights.values()  # (E,) each
        alone = (columns == keep[rows]) & (values == 1)  # a kept token carrying itself, unchanged
        mixing = torch.zeros(len(keep), dtype=torch.bool).index_fill_(0, rows[~alone], True)  # (K,)
        if not mixing.any():
            return None, mixing
        if "hidden@feature" not in signals:
            raise ExplorerError("a method that merges tokens must ask for the signal hidden@feature")
        hidden = signals["hidden@feature"].nan_to_num(0.0)  # (N, C); newlines have no encoder output
        used = mixing[rows]  # (E,) the entries of the mixing rows
        device = hidden.device
        terms = values[used].to(hidden)[:, None] * hidden[columns[used].to(device)]  # (E', C)
        mixed = torch.zeros(len(keep), hidden.shape[1], device=device).index_add_(0, rows[used].to(device), terms)
        return mixed, mixing

    @property
    def language_model(self):
        """The LLM's decoder stack (LlamaModel, Qwen2Model, ...)."""
        return self.model.model.language_model

    @property
    def depth(self) -> int:
        """The LLM's number of decoder layers."""
        return len(self.language_model.layers)

    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool, positions=None, compact_from=None):
        """Hooks that cut visual tokens inside the LLM while a `with` block runs; see `llm_prune.pruning`
        (`positions`: see `llm_prune.Decoder`; `compact_from`: the first layer whose cache is cut to the
        last cut's tokens after the prefill)."""
        from .llm_prune import Decoder, pruning  # which imports this file

        lm = self.language_model
        family = importlib.import_module(type(lm).__module__)  # its modeling file, loaded already
        decoder = Decoder(lm.layers, lm.rotary_emb, lm.norm, family.apply_rotary_pos_emb, positions)
        ids = prepared.inputs["input_ids"]  # (1, L)
        image = (ids[0] == self.image_token_id).nonzero()[:, 0]  # (N,)
        return pruning(decoder, image, ids.shape[1], cuts, needs, choose, keep_positions, compact_from)

    def generate_inputs(self, prepared: Prepared, features: torch.Tensor, keep: torch.Tensor) -> dict:
        """generate() arguments for a prompt that holds only the kept visual tokens, in LLM order."""
        ids, mask = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]  # (1, L)
        stay = self.staying(prepared, keep)
        kept = transformers.modeling_outputs.BaseModelOutputWithPooling(
            pooler_output=[features[keep.to(features.device)]]
        )
        return {"input_ids": ids[:, stay], "attention_mask": mask[:, stay], "mm_encoder_outputs": {"image": kept}}

    def batch_inputs(self, each: list[dict]) -> dict:
        """generate() arguments for several prompts at once, from each one's `generate_inputs`: the
        prompts left-padded to the longest, their kept visual tokens in the same order."""
        longest = max(inputs["input_ids"].shape[1] for inputs in each)

        def padded(key: str, value: int) -> torch.Tensor:  # (..., B, longest): the batch is the next-to-last dim
            return torch.cat([F.pad(i[key], (longest - i[key].shape[-1], 0), value=value) for i in each], -2)

        features = [f for inputs in each for f in inputs["mm_encoder_outputs"]["image"].pooler_output]
        kept = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=features)
        batch = {
            "input_ids": padded("input_ids", self.tokenizer.pad_token_id),
            "attention_mask": padded("attention_mask", 0),
        }
        if "position_ids" in each[0]:  # given per prompt (Qwen's M-RoPE); generate() goes on from each row's last
            batch["position_ids"] = padded("position_ids", 0)
        return batch | {"mm_encoder_outputs": {"image": kept}}

    def staying(self, prepared: Prepared, keep: torch.Tensor) -> torch.Tensor:
        """(L,) bool over the prompt: the text and the kept visual tokens."""
        ids = prepared.inputs["input_ids"]  # (1, L)
        image_positions = (ids[0] == self.image_token_id).nonzero()[:, 0]  # (N,)
        stay = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
        stay[image_positions] = False
        stay[image_positions[keep.to(ids.device)]] = True
        return stay


def anyres_layout(pack, unpad, image_size, pinpoints, tile: int, patch: int) -> tuple[Geometry, torch.Tensor]:
    """Geometry of an AnyRes image (LLaVA-NeXT, LLaVA-OneVision): a thumbnail ("base") of the whole
    image squashed to one tile, then the crops of the image resized into the best pinpoint without
    distortion and centred on padding, stitched into one grid, unpadded to the image's aspect ratio
    (and, in OneVision, downsampled), read row by row, each row closed by a newline.

    The order is the model's own: `pack(fields, newline)` runs the model's packing code on per-patch
    fields (crops, g*g, C) with `newline` (C,) for the newline token and returns (N, C); here each
    patch carries its row in the flat encoder output and its row and column in the stitched grid, so
    the packed result says which patches the LLM reads, in which order, and, when the grid was
    resampled, where each token samples it (bilinear resizing moves a linear field exactly).
    `unpad` is the model's unpad_image. A resampled token belongs to the crop that holds its centre.
    """
    height, width = image_size
    g = tile // patch  # tokens per crop side
    best_h, best_w = transformers.image_processing_utils.select_best_resolution((height, width), pinpoints)
    rows, cols = best_h // tile, best_w // tile  # crop grid
    crops = 1 + rows * cols  # thumbnail first
    cell = torch.arange(g * g)
    crop = torch.arange(crops)[:, None]
    y = torch.where(crop > 0, (crop - 1) // cols * g, 0) + cell // g  # (crops, g*g) row in the stitched grid
    x = torch.where(crop > 0, (crop - 1) % cols * g, 0) + cell % g
    index = torch.arange(crops * g * g).view(crops, g * g)
    fields = torch.stack([index, y, x], -1).double()  # (crops, g*g, 3)
    packed = pack(fields, torch.tensor([-1.0, math.nan, math.nan], dtype=torch.float64))  # (N, 3)

    stitched = torch.stack(torch.meshgrid(torch.arange(rows * g), torch.arange(cols * g), indexing="ij"))
    region = unpad(stitched, (height, width))  # (2, H, W) the cells left after unpadding
    y0, x0 = region[:, 0, 0].tolist() if region[0].numel() else (0, 0)
    base, grid = packed[: g * g], packed[g * g :]
    newline = grid[:, 0] < 0
    lines = int(newline.sum())  # rows of the grid the LLM reads, each closed by a newline
    per_line = (len(grid) - lines) // max(lines, 1)  # 0 when unpadding left no column (a 1-px-wide image)
    sy, sx = region.shape[1] / max(lines, 1), region.shape[2] / max(per_line, 1)  # cells per token: 1 unless resampled
    k = torch.arange(lines * per_line)
    i, j = k // per_line, k % per_line  # row and column of each token in the grid the LLM reads
    centre_y, centre_x = y0 + (i + 0.5) * sy, x0 + (j + 0.5) * sx  # in stitched cells
    torch.testing.assert_close(grid[~newline, 1:], torch.stack([centre_y, centre_x], 1).double() - 0.5)

    shape = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))
    new_h, new_w = transformers.image_processing_utils.get_patch_output_size(shape, (best_h, best_w), "channels_first")
    ys = _edges(y0 + torch.arange(lines + 1) * sy, g, tile, patch, (best_h - new_h) // 2, height / new_h, height)
    xs = _edges(x0 + torch.arange(per_line + 1) * sx, g, tile, patch, (best_w - new_w) // 2, width / new_w, width)
    boxes = torch.full((len(packed), 4), math.nan, dtype=torch.float64)
    bi, bj = cell // g, cell % g  # the thumbnail is the whole image squashed to a square, its last cells stretched
    by = (torch.arange(g + 1) * patch * height / tile).double().index_fill_(0, torch.tensor([g]), height)
    bx = (torch.arange(g + 1) * patch * width / tile).double().index_fill_(0, torch.tensor([g]), width)
    boxes[: g * g] = torch.stack([bx[bj], by[bi], bx[bj + 1], by[bi + 1]], 1)
    tokens = g * g + (~newline).nonzero()[:, 0]  # (T,) the grid's tokens in the packed sequence
    boxes[tokens] = torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]], 1)

    partition = torch.full((len(packed),), 1 + rows * cols)  # newlines last
    partition[: g * g] = 0
    part = 1 + (centre_y // g).long() * cols + (centre_x // g).long()  # (T,) the crop holding each centre
    partition[tokens] = part
    cells = torch.zeros(len(packed), 2, dtype=torch.long)
    cells[: g * g] = torch.stack([bi, bj], 1)
    first = torch.full((crops, 2), len(packed)).scatter_reduce(
        0, part[:, None].expand(-1, 2), torch.stack([i, j], 1), "amin"
    )
    cells[tokens] = torch.stack([i, j], 1) - first[part]  # from the crop's top-left token
    cells[g * g + newline.nonzero()[:, 0], 0] = torch.arange(lines)

    source = torch.full((len(packed),), -1)
    source[: g * g] = base[:, 0].long()
    if sy == sx == 1:  # not resampled: every grid token is one patch of one crop
        source[tokens] = grid[~newline, 0].long()
    names = ("base", *(f"crop {r},{c}" for r in range(rows) for c in range(cols)), "newline")
    return Geometry(names, partition, cells, boxes.float(), (width, height)), source


def _edges(lines: torch.Tensor, g: int, tile: int, patch: int, offset: int, scale: float, limit: int) -> torch.Tensor:
    """Pixel positions on the original image of stitched-grid lines along one axis (g patches of
    `patch` px per `tile` px crop: a crop's unseen last pixels go to its last cell); the outermost
    are stretched to the image border, so the unpadded grid tiles the whole image."""
    crop, within = torch.div(lines.double(), g, rounding_mode="floor"), torch.remainder(lines.double(), g)
    edges = ((crop * tile + within * patch - offset) * scale).clamp(0, limit)
    edges[0], edges[-1] = 0, limit
    return edges


def build_tokenizer(specials: list[str], corpus: str, **tokens):
    """A small byte-level BPE tokenizer with the given special tokens, trained on `corpus`, for the
    random-weight models; `tokens` names its bos/eos/unk/pad tokens and extra special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([corpus], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)


CORPUS = "USER: ASSISTANT: What is shown in this image? Describe the photo, the chart and the text in it."
VICUNA = (  # llava-hf's chat template for LLaVA-1.5 and LLaVA-1.6 Vicuna: "USER: <image>\n... ASSISTANT:"
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llama_tokenizer():
    """The random-weight LLaVA models' tokenizer: <s>, </s>, <unk>, <pad> and <image>."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return build_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        CORPUS,
        **specials,
        extra_special_tokens={"image_token": "<image>"},
    )


def text_config(tokenizer, sizes: tuple[int, int, int, int], **settings) -> dict:
    """A tiny LLM's config: sizes (hidden, layers, heads, mlp), the tokenizer's vocabulary and bos, eos
    and pad ids, 4096 positions; `settings` add to it (model_type first of all)."""
    hidden, layers, heads, mlp = sizes
    sized = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp)
    return (
        dict(vocab_size=len(tokenizer), num_key_value_heads=heads, max_position_embeddings=4096)
        | sized
        | {
            **token_ids(tokenizer),
            **settings,
        }
    )


def token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's bos, eos and pad ids as config settings."""
    return {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}


@functools.cache
def image_only(processor_class: type) -> type:
    """`processor_class`, a composite processor (OneVision, Qwen2-VL, SmolVLM), taking a plain
    `BaseVideoProcessor` as its video processor.

    transformers 5 insists on a video processor for these, and every real one needs torchvision,
    which CPU-only machines often cannot install (its wheels are built against CUDA torch). The
    explorer never processes video, so a stand-in that is never called takes its place: images,
    tokens and chat template are the processor's own. The subclass only widens the class check.
    """
    from transformers.video_processing_utils import BaseVideoProcessor

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and type(argument) is BaseVideoProcessor:
                return BaseVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__  # what save_pretrained records
    return ImageOnly


def image_only_processor(processor_class: type, path: str, **hub):
    """The processor saved at `path`, without its video processor (see `image_only`)."""
    from transformers.video_processing_utils import BaseVideoProcessor

    parts = {
        "image_processor": transformers.AutoImageProcessor.from_pretrained(path, **hub),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(path, **hub),
        "video_processor": BaseVideoProcessor(),
    }
    cls = image_only(processor_class)
    settings, extra = cls.get_processor_dict(path, **hub)
    return cls.from_args_and_dict([parts[name] for name in cls.get_attributes()], settings, **extra)


def save_random(model_class: str, config, processor, folder: Path) -> None:
    """Save a random-weight model of `config`, seeded, and its processor, to `folder`."""
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    processor.save_pretrained(folder)
