"""LLaVA-NeXT (LLaVA-1.6, llava-hf checkpoints): a CLIP thumbnail of the whole image plus AnyRes crops.

Visual tokens in LLM order: the 24x24 thumbnail ("base"), then the crops stitched into one grid,
unpadded to the image's aspect ratio and read row by row, each row closed by a newline token.
Geometry is read off the model's own `pack_image_features`, run on token indices instead of
features, so it always matches the sequence the LLM receives.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import torch
import transformers  # lazy: its model code loads on first use, not when this file is imported

from .base import KINDS, ExplorerError, Geometry, Prepared, encoder_signals, pick_dtype
from .llm_prune import Decoder, pruning

DEFAULT = "llava-hf/llava-v1.6-vicuna-7b-hf"  # the HiRED paper's model


class LlavaNext:
    model_type = "llava_next"
    family = "LLaVA-NeXT"

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        self.model, self.processor, self.name, self.random_weights = model, processor, name, random_weights
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default":
            raise ExplorerError(f"{name}: only the 'default' vision feature strategy of LLaVA-NeXT is supported")
        self.tile, self.patch = cfg.vision_config.image_size, cfg.vision_config.patch_size  # 336, 14 px
        self.side = self.tile // self.patch  # tokens per crop side (24)
        self.encoder = model.model.vision_tower.encoder.layers
        vfl = cfg.vision_feature_layer  # hidden_states index; the layer that makes it is one below
        self.feature_layer = len(self.encoder) + vfl if isinstance(vfl, int) and vfl < 0 else vfl - 1
        self.vision_layers = len(self.encoder)
        self.max_positions = cfg.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str, device: torch.device, name: str, random_weights=False, **hub) -> LlavaNext:
        processor = transformers.AutoProcessor.from_pretrained(path, **hub)
        # accelerate spreads the model over the GPUs, then CPU, when it does not fit one device
        placement = {"device_map": "auto"} if device.type == "cuda" else {}
        model = transformers.LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=pick_dtype(device), **placement, **hub
        )
        return cls(model.to(device) if not placement else model, processor, name, random_weights)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prepare(self, image, prompt: str) -> Prepared:
        """Chat template + processor on one PIL image, and the geometry of its visual tokens."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if self.processor.chat_template:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = f"{self.processor.image_token}\n{prompt}"
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        geometry, source = self.layout(inputs["image_sizes"][0].tolist())
        n_image = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        assert n_image == len(geometry), f"processor inserted {n_image} image tokens, geometry has {len(geometry)}"
        return Prepared(inputs, geometry, source, inputs["input_ids"].shape[1] - n_image)

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels, and each token's row in the flat encoder output."""
        height, width = image_size
        cfg, g = self.model.config, self.side
        best_h, best_w = transformers.image_processing_utils.select_best_resolution(
            (height, width), cfg.image_grid_pinpoints
        )
        rows, cols = best_h // self.tile, best_w // self.tile  # crop grid
        crops = 1 + rows * cols  # thumbnail first
        index = torch.arange(crops * g * g, dtype=torch.float64).view(crops, g * g, 1)
        (packed,), _ = self.model.model.pack_image_features(
            [index], [(height, width)], "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        source = packed[:, 0].long()  # (N,) crop * g*g + patch, -1 for newline
        newline = source < 0
        crop, patch = source.clamp(min=0) // (g * g), source.clamp(min=0) % (g * g)
        i, j = patch // g, patch % g  # cell inside the crop's own grid
        partition = torch.where(newline, 1 + rows * cols, crop)
        cells = torch.stack([torch.where(newline, newline.cumsum(0) - 1, i), torch.where(newline, 0, j)], 1)

        boxes = torch.full((len(source), 4), math.nan, dtype=torch.float64)
        base = (crop == 0) & ~newline
        x, y = j[base].double(), i[base].double()  # the thumbnail is the whole image squashed to a square
        boxes[base] = torch.stack([x * width / g, y * height / g, (x + 1) * width / g, (y + 1) * height / g], 1)
        tiles = ~newline & ~base
        if tiles.any():
            # crops show the image resized into (best_h, best_w) without distortion and centred on padding
            shape = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))
            new_h, new_w = transformers.image_processing_utils.get_patch_output_size(
                shape, (best_h, best_w), "channels_first"
            )
            gy = (crop - 1) // cols * g + i  # row and column in the stitched grid
            gx = (crop - 1) % cols * g + j
            ys = self._edges(gy[tiles], (best_h - new_h) // 2, height / new_h, height)
            xs = self._edges(gx[tiles], (best_w - new_w) // 2, width / new_w, width)
            boxes[tiles] = torch.stack([xs[0], ys[0], xs[1], ys[1]], 1)

        names = ("base", *(f"crop {r},{c}" for r in range(rows) for c in range(cols)), "newline")
        return Geometry(names, partition, cells, boxes.float(), (width, height)), source

    def _edges(self, cell: torch.Tensor, offset: int, scale: float, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end on the original image of stitched-grid cells along one axis; the outermost kept
        cells are stretched to the image border, so the unpadded grid tiles the whole image."""
        lo, hi = int(cell.min()), int(cell.max()) + 1
        edges = ((torch.arange(lo, hi + 1) * self.patch - offset) * scale).clamp(0, limit).double()
        edges[0], edges[-1] = 0, limit
        return edges[cell - lo], edges[cell - lo + 1]

    def encode(self, prepared: Prepared, needs: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the vision stage: (N, D) projected features in LLM order, and the signals asked for
        (see `explorer.Signals`): the (N,) attention rows on the CPU, the rest on the model's device."""
        asked = {name: self._signal(name) for name in needs if name != "features"}  # name -> (kind, layer)
        wants: dict[int, set[str]] = {}
        for kind, layer in asked.values():
            wants.setdefault(layer, set()).add(kind)
        inputs = prepared.inputs
        with encoder_signals(self.encoder, wants) as captured:
            out = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
            )
        features = out.pooler_output[0]  # (N, D)
        signals = {"features": features} if "features" in needs else {}
        for name, (kind, layer) in asked.items():
            flat = captured[kind, layer].flatten(0, 1)  # (crops * g*g, ...)
            flat = flat.cpu() if flat.dim() == 1 else flat
            src = prepared.source.to(flat.device)
            rows = flat[src.clamp(min=0)]  # (N, ...) in LLM order
            signals[name] = rows.masked_fill((src < 0).view(-1, *[1] * (rows.dim() - 1)), math.nan)
        return features, signals

    def _signal(self, name: str) -> tuple[str, int]:
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
        keep, weights = selection.keep, selection.weights.coalesce()  # (K,), sparse (K, N) on the CPU
        (rows, columns), values = weights.indices(), weights.values()  # (E,) each
        alone = (columns == keep[rows]) & (values == 1)  # a kept token carrying itself, unchanged
        mixing = torch.zeros(len(keep), dtype=torch.bool).index_fill_(0, rows[~alone], True)  # (K,)
        if not mixing.any():
            return features
        if "hidden@feature" not in signals:
            raise ExplorerError("a method that merges tokens must ask for the signal hidden@feature")
        hidden = signals["hidden@feature"].nan_to_num(0.0)  # (N, C); newlines have no encoder output
        used = mixing[rows]  # (E,) the entries of the mixing rows
        device = hidden.device
        terms = values[used].to(hidden)[:, None] * hidden[columns[used].to(device)]  # (E', C)
        mixed = torch.zeros(len(keep), hidden.shape[1], device=device).index_add_(0, rows[used].to(device), terms)
        projector = self.model.model.multi_modal_projector
        merged = features.clone()
        merged[keep[mixing].to(merged.device)] = projector(mixed[mixing.to(device)].to(features.dtype)).to(merged.dtype)
        return merged

    @property
    def depth(self) -> int:
        """The LLM's number of decoder layers."""
        return len(self.model.model.language_model.layers)

    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool):
        """Hooks that cut visual tokens inside the LLM while a `with` block runs; see `llm_prune.pruning`."""
        lm = self.model.model.language_model  # LlamaModel, MistralModel, ...
        family = importlib.import_module(type(lm).__module__)  # its modeling file, loaded already
        decoder = Decoder(lm.layers, lm.rotary_emb, lm.norm, family.apply_rotary_pos_emb)
        ids = prepared.inputs["input_ids"]  # (1, L)
        image = (ids[0] == self.model.config.image_token_id).nonzero()[:, 0]  # (N,)
        return pruning(decoder, image, ids.shape[1], cuts, needs, choose, keep_positions)

    def generate_inputs(self, prepared: Prepared, features: torch.Tensor, keep: torch.Tensor) -> dict:
        """generate() arguments for a prompt that holds only the kept visual tokens, in LLM order."""
        ids, mask = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]  # (1, L)
        image_positions = (ids[0] == self.model.config.image_token_id).nonzero()[:, 0]  # (N,)
        stay = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
        stay[image_positions] = False
        stay[image_positions[keep.to(ids.device)]] = True
        kept = transformers.modeling_outputs.BaseModelOutputWithPooling(
            pooler_output=[features[keep.to(features.device)]]
        )
        return {"input_ids": ids[:, stay], "attention_mask": mask[:, stay], "mm_encoder_outputs": {"image": kept}}


# Random-weight models with the llava-hf 1.6 processor geometry (336-px crops, patch 14, the llava-hf
# grid pinpoints): token counts and overlays are real, answers are gibberish.
RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp)
    "tiny-llava-next": ((32, 3, 4, 64), (32, 4, 4, 64)),  # tests and the offline smoke run
    "small-llava-next": ((256, 8, 8, 1024), (512, 8, 8, 1408)),  # CPU benchmarks
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_random(name: str, folder: Path) -> None:
    """Write the random-weight checkpoint `name` (a key of RANDOM) to `folder`, deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    (v_hidden, v_layers, v_heads, v_mlp), (t_hidden, t_layers, t_heads, t_mlp) = RANDOM[name]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    corpus = ["USER: ASSISTANT: What is shown in this image? Describe the photo, the chart and the text in it."]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        chat_template=CHAT_TEMPLATE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ids = {
        f"{k}_token_id": tokenizer.convert_tokens_to_ids(t)
        for k, t in [("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>")]
    }
    config = LlavaNextConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=t_hidden,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            num_key_value_heads=t_heads,
            intermediate_size=t_mlp,
            max_position_embeddings=4096,
            **ids,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=336,
            patch_size=14,
            hidden_size=v_hidden,
            num_hidden_layers=v_layers,
            num_attention_heads=v_heads,
            intermediate_size=v_mlp,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **ids,
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
