"""`Backend`, the surface every model family implements (one subclass per family, one file each), with
what every family shares: loading a checkpoint and its processor, the prompt with only the kept tokens,
the vision stage with the signals methods read, the projector on kept and merged tokens, and the hooks
that prune inside the LLM."""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
import transformers  # lazy: its model code loads on first use, not when this file is imported

from .encoder_merge import merged
from .errors import ExplorerError
from .geometry import Geometry, Prepared, Times
from .llm_prune import Decoder, early_pass, pruning
from .loading import LOADING
from .signals import CLIP_TAPS, FEATURES, HIDDEN, HIDDEN_FEATURE, PADDED, ROWS, Taps, encoder_signals, parse


def pick_device(device: str | None = None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    taps: Taps = CLIP_TAPS  # the modules of its layers the signal hooks read
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
        # accelerate spreads the model over the GPUs, then CPU; a GPU named by its index gets the whole model
        placement = {"device_map": "auto"} if device.type == "cuda" and device.index is None else {}
        with LOADING:  # one model built at a time (loading.py)
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

    def chat(self, prompt: str, part: str = "image") -> str:
        """The prompt in the model's chat template: one user turn, the image (or video) and then the text."""
        messages = [{"role": "user", "content": [{"type": part}, {"type": "text", "text": prompt}]}]
        if self.processor.chat_template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{self.processor.video_token if part == 'video' else self.processor.image_token}\n{prompt}"

    def prepare(self, image, prompt: str) -> Prepared:
        """Chat template + processor on one PIL image, and the geometry of its visual tokens."""
        text = self.chat(prompt)
        inputs = self.processor(images=image, text=text, return_tensors="pt", **self.image_options()).to(self.device)
        geometry, source = self.layout([image.height, image.width])
        n_image = int((inputs["input_ids"] == self.image_token_id).sum())
        assert n_image == len(geometry), f"processor inserted {n_image} image tokens, geometry has {len(geometry)}"
        return Prepared(inputs, geometry, source, inputs["input_ids"].shape[1] - n_image)

    def prepare_video(self, frames: list, prompt: str, times_s: Times = None, duration_s: float = 0.0) -> Prepared:
        """Chat template + video processor on exactly these PIL frames (at `times_s`, of `duration_s`: 0 if unknown)."""
        raise ExplorerError(f"{self.family} takes no video here yet")

    def visual_token_id(self, prepared: Prepared) -> int:
        """The id of the prompt's visual tokens: the image token, or a clip's video token."""
        return self.model.config.video_token_id if prepared.video else self.image_token_id

    def encoder_outputs(self, prepared: Prepared, kept: torch.Tensor) -> dict:
        """generate()'s `mm_encoder_outputs` for (K, D) kept visual tokens of this prompt."""
        return {"image": transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=[kept])}

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
        None: `kept_features` projects the tokens kept, from the HIDDEN_FEATURE signal. With a
        `merging` plan (`encoder_merge.Merging`, families that `projects_kept`) the encoder merges
        tokens as it runs and gives only the signals of `encoder_merge.merged`."""
        if merging is not None:
            if set(needs) - {HIDDEN_FEATURE}:
                raise ExplorerError("a method that merges inside the vision encoder reads only what the merging gives")
            return None, merged(self, prepared, merging)
        asked = {name: self.signal(name) for name in needs if name not in (FEATURES, ROWS)}  # name -> (kind, layer)
        grid = [name for name in needs if name == ROWS or name.startswith(PADDED)]
        if grid and not self.one_patch_each(prepared):
            raise ExplorerError(
                f"{self.family} makes the visual tokens of this image from several encoder patches each, so it "
                f"cannot give {grid[0]!r} (every encoder position of every crop, as the official LLaVA code "
                "ranks them); try LLaVA-NeXT or LLaVA-1.5"
            )
        wants: dict[int, set[str]] = {}
        for kind, layer in asked.values():
            wants.setdefault(layer, set()).add(kind)
        with self.hooks(prepared, wants) as captured:
            features = self.image_features(prepared) if project else self.vision_tower(self.crops(prepared))
        signals = {FEATURES: features} if FEATURES in needs else {}
        signals |= {ROWS: prepared.source} if ROWS in needs else {}
        for name, (kind, layer) in asked.items():
            if name.startswith(PADDED):  # (crops, T', ...) as captured, padding included
                rows = captured[kind, layer]
                signals[name] = rows.cpu() if rows.dim() == 2 else rows
                continue
            rows = self.tokens_of(prepared, captured[kind, layer], fold="concat" if kind == HIDDEN else "mean")
            signals[name] = rows.cpu() if rows.dim() == 1 else rows
        return features, signals

    @property
    def vision_layers(self) -> int:
        """The vision encoder's number of layers."""
        return len(self.encoder)

    def hooks(self, prepared: Prepared, wants: dict[int, set[str]]):
        """A context manager that captures the signals of the chosen layers during the vision stage."""
        return encoder_signals(self.encoder, wants, cls=self.cls_token, taps=self.taps)

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

    def encoder_sequences(self, prepared: Prepared) -> list[int]:
        """The patches of each sequence the vision encoder attends over as a whole, for the cost model
        (`explorer.engine.cost.VisionPass`); here one per crop `crops` gives ([CLS] not counted)."""
        pixels = self.crops(prepared)  # (crops, 3, H, W)
        patch = self.model.config.vision_config.patch_size
        return [(pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)] * len(pixels)

    def encoder_windows(self, prepared: Prepared) -> list[int]:
        """The patches of each window the encoder's windowed layers attend within; none here."""
        return []

    def vision_tower(self, pixels: torch.Tensor) -> None:
        """Run the vision encoder alone on (crops, 3, H, W) pixels, for its hooks (families that `projects_kept`)."""
        self.model.model.vision_tower(pixels)

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
        """(K, C) feature-layer encoder outputs, as HIDDEN_FEATURE holds them -> (K, D) LLM inputs;
        here the LLaVA projector."""
        return self.model.model.multi_modal_projector(hidden)

    def signal(self, name: str) -> tuple[str, int]:
        """(kind, layer) of a vision signal name such as cls@0, keys@feature or hidden@last."""
        return parse(name.removeprefix(PADDED), self.family, len(self.encoder), self.feature_layer)

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
        fill them, from the encoder outputs (HIDDEN_FEATURE): the projector runs on the kept tokens
        alone (families that `projects_kept`, whose every token but the newlines is one patch)."""
        hidden = signals[HIDDEN_FEATURE]  # (N, C), NaN rows for newlines
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

    @staticmethod
    def mixing(selection) -> torch.Tensor:
        """(K,) bool: whether kept token k absorbs others (`Selection.weights`, which must be set), so that
        `merge` projects its mix of encoder outputs."""
        keep, weights = selection.keep, selection.weights.coalesce()  # (K,), sparse (K, N) on the CPU
        (rows, columns), values = weights.indices(), weights.values()  # (E,) each
        alone = (columns == keep[rows]) & (values == 1)  # a kept token carrying itself, unchanged
        return torch.zeros(len(keep), dtype=torch.bool).index_fill_(0, rows[~alone], True)

    def _mixed(self, signals: dict[str, torch.Tensor], selection) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(K, C) sum_j weights[k, j] * hidden_j for every kept token (zeros where it carries only
        itself), None when no token absorbs others; and (K,) bool: whether kept token k does."""
        keep, weights = selection.keep, selection.weights.coalesce()  # (K,), sparse (K, N) on the CPU
        (rows, columns), values = weights.indices(), weights.values()  # (E,) each
        mixing = self.mixing(selection)  # (K,)
        if not mixing.any():
            return None, mixing
        if HIDDEN_FEATURE not in signals:
            raise ExplorerError(f"a method that merges tokens must ask for the signal {HIDDEN_FEATURE}")
        hidden = signals[HIDDEN_FEATURE].nan_to_num(0.0)  # (N, C); newlines have no encoder output
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

    def decoder(self, positions=None) -> Decoder:
        """What the LLM's hooks need of its decoder (`positions`: see `llm_prune.Decoder`)."""
        lm = self.language_model
        family = importlib.import_module(type(lm).__module__)  # its modeling file, loaded already
        return Decoder(lm.layers, lm.rotary_emb, lm.norm, family.apply_rotary_pos_emb, positions)

    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool, positions=None, **options):
        """Hooks that cut visual tokens inside the LLM while a `with` block runs; see `llm_prune.pruning`
        (`positions`: see `llm_prune.Decoder`; `options`: compact_from, rerank)."""
        ids = prepared.inputs["input_ids"]  # (1, L)
        image = (ids[0] == self.visual_token_id(prepared)).nonzero()[:, 0]  # (N,)
        return pruning(self.decoder(positions), image, ids.shape[1], cuts, needs, choose, keep_positions, **options)

    def early_pass(self, prepared: Prepared, features: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
        """The LLM run on the whole prompt, every visual token in, until its decoder layer `layer`: the
        signals a method reads there (`llm_prune.early_pass`)."""
        inputs = self.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
        image = (prepared.inputs["input_ids"][0] == self.visual_token_id(prepared)).nonzero()[:, 0]  # (N,)
        return early_pass(self.decoder(), image, layer, lambda: self.model(**inputs, use_cache=False))

    def generate_inputs(self, prepared: Prepared, features: torch.Tensor, keep: torch.Tensor) -> dict:
        """generate() arguments for a prompt that holds only the kept visual tokens, in LLM order."""
        ids, mask = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]  # (1, L)
        stay = self.staying(prepared, keep)
        kept = self.encoder_outputs(prepared, features[keep.to(features.device)])
        return {"input_ids": ids[:, stay], "attention_mask": mask[:, stay], "mm_encoder_outputs": kept}

    def batch_inputs(self, each: list[dict]) -> dict:
        """generate() arguments for several prompts at once, from each one's `generate_inputs`: the
        prompts left-padded to the longest, their kept visual tokens in the same order."""
        longest = max(inputs["input_ids"].shape[1] for inputs in each)

        def padded(key: str, value: int) -> torch.Tensor:  # (..., B, longest): the batch is the next-to-last dim
            return torch.cat([F.pad(i[key], (longest - i[key].shape[-1], 0), value=value) for i in each], -2)

        outputs, kept = [inputs["mm_encoder_outputs"] for inputs in each], {}
        for modality in ("image", "video"):  # images: lists of (K, D); clips: (1, K, D); filled in the batch's order
            parts = [output[modality].pooler_output for output in outputs if modality in output]
            if parts:
                joined = [f for part in parts for f in part] if modality == "image" else torch.cat(parts, 1)
                kept[modality] = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=joined)
        batch = {
            "input_ids": padded("input_ids", self.tokenizer.pad_token_id),
            "attention_mask": padded("attention_mask", 0),
        }
        if "position_ids" in each[0]:  # given per prompt (Qwen's M-RoPE); generate() goes on from each row's last
            batch["position_ids"] = padded("position_ids", 0)
        return batch | {"mm_encoder_outputs": kept}

    def staying(self, prepared: Prepared, keep: torch.Tensor) -> torch.Tensor:
        """(L,) bool over the prompt: the text and the kept visual tokens."""
        ids = prepared.inputs["input_ids"]  # (1, L)
        image_positions = (ids[0] == self.visual_token_id(prepared)).nonzero()[:, 0]  # (N,)
        stay = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
        stay[image_positions] = False
        stay[image_positions[keep.to(ids.device)]] = True
        return stay
