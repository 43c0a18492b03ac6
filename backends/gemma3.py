"""Gemma 3 (Google's checkpoints, model type gemma3: gemma-3-4b-it, 12b-it, 27b-it): SigLIP at 896 px, each
image's 64x64 patches average-pooled 4x4 into 16x16 = 256 visual tokens, wrapped in <start_of_image> ...
<end_of_image>; a Gemma LLM whose layers alternate five sliding-window ones (local attention, their own rotary
embedding) and one global one, and in which the visual tokens of one image attend to each other both ways.

Geometry. The processor squashes the whole image to 896x896 (no aspect ratio kept): one partition, "image",
its 16x16 grid row by row, each token's box a 1/16 x 1/16 cell of the user's image. With pan-and-scan
(`pan_and_scan`, the processor's `do_pan_and_scan`: off in the published checkpoints, on when a checkpoint's
preprocessor config turns it on, or when set on the backend) an image whose aspect ratio is at least 1.2
also gets 2 to 4 crops side by side (or one above another) along its longer side, each squashed to 896x896
in turn: the partitions are then "global" (the whole image, first in the prompt) and "crop 0,j" (or
"crop i,0"), each 16x16 over its part of the image (`views`, the processor's rule).

Signals. SigLIP has no [CLS] token: "cls@<layer>" and its kinds are the attention each of the 4096 patches of
a view receives, as on the other SigLIP and Qwen families (`backends.signals.attention_maps`), and every
vision signal of a visual token is the mean of its 4x4 patches, as the model pools them ("hidden" gives the 16
patches side by side, in the pooling order, for merging methods: `project` pools them as the model does,
after the encoder's final norm). No signal exists at single encoder positions ("padded ..." and "encoder
rows": every token is 16 patches), so the methods that read them are refused, as are those that need every
token to be one patch ("patch tokens") or a thumbnail beside crops (refused with pan-and-scan as well).

Inside the LLM (`llm_prune`): the decoder layers get a mask and a rotary embedding of their own kind
("sliding_attention" or "full_attention"); `decoder` declares each layer's kind, so that a cut narrows each
kind's own mask (the bidirectional image block kept: kept tokens of one image still see each other) and
renumbers positions with each kind's own rotary embedding. While the prompt and the answer fit in the
sliding window (1024 tokens in the checkpoints), the sliding layers' mask is the global one; a cut on a
longer sequence is refused (`pruning`), since the sliding layers' caches then hold only their last window.
Without cuts (and for methods that drop tokens before the LLM) the model builds its own masks on the
shortened prompt, from the `token_type_ids` of the tokens kept (`generate_inputs`).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch
import transformers

from .base import Backend
from .errors import ExplorerError
from .geometry import Geometry, Prepared
from .llm_prune import Decoder
from .random_models import build_tokenizer, text_config, token_ids, vision_config

DEFAULT = "google/gemma-3-4b-it"
PAN_AND_SCAN = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


class Gemma3(Backend):
    model_type = "gemma3"
    family = "Gemma 3"
    model_class = "Gemma3ForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    cls_token = False

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        vision = model.model.vision_tower  # SiglipVisionModel
        self.encoder = vision.encoder.layers
        self.feature_layer = len(self.encoder) - 1  # the last layer's output, through the final norm, is pooled
        self.side = int(math.isqrt(cfg.mm_tokens_per_image))  # tokens per side of a view (16)
        self.pool = cfg.vision_config.image_size // cfg.vision_config.patch_size // self.side  # patches a side (4)
        self.pan_and_scan = bool(processor.image_processor.do_pan_and_scan)  # the checkpoint's setting

    def chat(self, prompt: str, part: str = "image") -> str:
        """Gemma's chat template without the <bos> it starts with: the tokenizer adds it, as the template's
        own tokenization (apply_chat_template with tokenize=True) does, so the prompt has one."""
        return super().chat(prompt, part).removeprefix(self.tokenizer.bos_token)

    def image_options(self) -> dict:
        """Pan-and-scan on or off (`pan_and_scan`), with the checkpoint's crop settings or the processor's defaults."""
        ip, defaults = self.processor.image_processor, type(self.processor).images_kwargs
        options = {key: defaults[key] if getattr(ip, key) is None else getattr(ip, key) for key in PAN_AND_SCAN}
        return options | {"do_pan_and_scan": self.pan_and_scan}

    def views(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(x0, y0, x1, y1) of each view the encoder sees, on the image, in prompt order: the whole image, then
        the pan-and-scan crops (none unless `pan_and_scan`, or when the image is not elongated enough). The
        processor's rule (image_processing_gemma3.py, `pan_and_scan_batched`): n = round(long / short) crops
        along the longer side, at most long / min_crop, at least 2 and at most max_crops, each ceil(long / n)
        long (the last one cut at the image's edge); none when a crop would be shorter than min_crop."""
        whole = [(0, 0, width, height)]
        if not self.pan_and_scan:
            return whole
        o = self.image_options()
        size, most, ratio = (o[key] for key in PAN_AND_SCAN)
        long, short = max(width, height), min(width, height)
        if long / short < ratio:
            return whole
        n = min(most, max(2, min(int(math.floor(long / short + 0.5)), int(math.floor(long / size)))))
        step = int(math.ceil(long / n))
        if min(step, short) < size:
            return whole
        if width >= height:
            return whole + [(j * step, 0, min(width, (j + 1) * step), height) for j in range(n)]
        return whole + [(0, i * step, width, min(height, (i + 1) * step)) for i in range(n)]

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels: each view's 16x16 grid in raster order, view by view;
        no token is a single encoder row (each pools 4x4 patches)."""
        height, width = image_size
        views, g = self.views(height, width), self.side
        if len(views) == 1:
            names = ("image",)
        else:
            wide = views[1][1] == 0 and views[-1][1] == 0  # crops side by side
            names = ("global", *(f"crop 0,{j}" if wide else f"crop {j},0" for j in range(len(views) - 1)))
        cell = torch.arange(g * g)
        i, j = cell // g, cell % g
        boxes = []
        for x0, y0, x1, y1 in views:
            x = x0 + torch.arange(g + 1) * (x1 - x0) / g  # (g + 1,) column edges on the image
            y = y0 + torch.arange(g + 1) * (y1 - y0) / g
            boxes.append(torch.stack([x[j], y[i], x[j + 1], y[i + 1]], 1))
        partition = torch.arange(len(views)).repeat_interleave(g * g)
        cells = torch.stack([i, j], 1).repeat(len(views), 1)
        geometry = Geometry(names, partition, cells, torch.cat(boxes).float(), (width, height))
        return geometry, torch.full((len(partition),), -1)

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=prepared.inputs["pixel_values"], return_dict=True)
        return out.pooler_output.flatten(0, 1)  # (views * 256, D)

    def crops(self, prepared: Prepared) -> torch.Tensor:
        return prepared.inputs["pixel_values"]  # (views, 3, 896, 896)

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        """(views, 4096, ...) patch values -> (N, ...) the mean of each token's 4x4 patches (fold="mean", as the
        model's average pooling), or (N, 16 * C) its patches side by side, row by row (fold="concat")."""
        views, _, *rest = values.shape
        g, p = self.side, self.pool
        grid = values.reshape(views, g, p, g, p, -1).permute(0, 1, 3, 2, 4, 5)  # (views, g, g, p, p, C)
        patches = grid.reshape(views * g * g, p * p, -1)  # (N, 16, C)
        return patches.mean(1).view(-1, *rest) if fold == "mean" else patches.flatten(1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, 16 * C) each token's 16 patches (the last layer's outputs, HIDDEN_FEATURE) -> (K, D): the encoder's
        final norm on each patch, their mean (the model's average pooling), the projector's norm and matrix."""
        vision, projector = self.model.model.vision_tower, self.model.model.multi_modal_projector
        pooled = vision.post_layernorm(hidden.view(len(hidden), self.pool**2, -1)).mean(1)  # (K, C)
        return projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight

    def encoder_outputs(self, prepared: Prepared, kept: torch.Tensor) -> dict:
        """generate()'s `mm_encoder_outputs` for (K, D) kept visual tokens: one (1, K, D) tensor, which the model
        scatters into its image tokens in order."""
        return {"image": transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=kept[None])}

    def generate_inputs(self, prepared: Prepared, features: torch.Tensor, keep: torch.Tensor) -> dict:
        """As every family's, with the kept tokens' `token_type_ids` (1 for a visual token), from which the model
        makes the visual tokens of one image attend to each other both ways."""
        inputs = super().generate_inputs(prepared, features, keep)
        stay = self.staying(prepared, keep)
        return inputs | {"token_type_ids": prepared.inputs["token_type_ids"][:, stay]}

    def batch_inputs(self, each: list[dict]) -> dict:
        """As every family's, with the token types left-padded as the prompts are, and the kept tokens of all the
        images as one (1, K_total, D) tensor in the batch's order."""
        batch = super().batch_inputs(each)
        longest = batch["input_ids"].shape[1]
        types = [
            torch.nn.functional.pad(i["token_type_ids"], (longest - i["token_type_ids"].shape[1], 0)) for i in each
        ]
        joined = torch.cat(list(batch["mm_encoder_outputs"]["image"].pooler_output))[None]  # (1, K_total, D)
        kept = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=joined)
        return batch | {"token_type_ids": torch.cat(types), "mm_encoder_outputs": {"image": kept}}

    @property
    def window(self) -> int:
        """The sliding-window layers' window, in tokens."""
        return self.model.config.text_config.sliding_window

    def decoder(self, positions=None) -> Decoder:
        """As every family's, with each layer's kind (its own mask and rotary embedding) and the queries and keys
        normalised per head before RoPE, as Gemma 3's attention does."""
        kinds = tuple(self.language_model.config.layer_types)
        return dataclasses.replace(super().decoder(positions), qk_norm=True, kinds=kinds)

    @contextmanager
    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool, positions=None, **options):
        """As every family's, on a prompt that, with its answer, fits in the sliding window; refused otherwise,
        with the reason, before the prompt (or during the answer, once it outgrows the window). A choice at each
        decode step (`attend`) is refused too."""
        if options.get("attend") is not None:  # a step's narrowed view would not outlive a change of layer kind
            raise ExplorerError(f"{self.family} cannot choose visual tokens again at each decode step (DyCoke's) yet")
        length = prepared.inputs["input_ids"].shape[1]
        if length >= self.window:
            raise ExplorerError(self.too_long(length))

        def check(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            seen = 0 if cache is None else cache.get_seq_length(0)
            if seen + kwargs["inputs_embeds"].shape[1] >= self.window:
                raise ExplorerError(self.too_long(seen + kwargs["inputs_embeds"].shape[1]))

        handle = self.language_model.register_forward_pre_hook(check, with_kwargs=True)
        try:
            with super().pruning(prepared, cuts, needs, choose, keep_positions, positions, **options) as record:
                yield record
        finally:
            handle.remove()

    def too_long(self, length: int) -> str:
        return (
            f"{self.family} cannot cut tokens inside its LLM on {length} tokens: its sliding-window layers then attend "
            f"to their last {self.window} only, and their caches hold only those, so the cuts could not keep their "
            "masks right; use a method that drops tokens before the LLM, a smaller image or a shorter answer"
        )


RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp); the LLM has gemma-3-4b's 34 layers
    "tiny-gemma3": ((32, 2, 2, 64), (32, 34, 2, 64)),
}
# google/gemma-3-4b-it's chat template (tests/mirrors/google--gemma-3-4b-it holds it as published)
CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    '    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n    {%- endif -%}\n'
    "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def gemma_tokenizer():
    """The random-weight model's tokenizer: Gemma's special tokens, and <bos> put before every text, as Gemma's."""
    from tokenizers import processors

    tokenizer = build_tokenizer(
        SPECIALS + list(IMAGE_TOKENS.values()),
        "user model What is shown in this image? Describe the photo, the chart and the text in it.",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=IMAGE_TOKENS,
    )
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    return tokenizer


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with gemma-3-4b-it's processor geometry (896 px
    squashed, patch 14, mean and std 0.5, 256 tokens an image, pan-and-scan off) and its LLM's depth, layer kinds
    (five sliding-window layers of 1024 tokens, then a global one), rotary embeddings (10000 local; 1e6 global,
    scaled linearly by 8) and positions (131072), at tiny widths."""
    vision, text = RANDOM[name]
    tokenizer = gemma_tokenizer()
    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor(size={"height": 896, "width": 896}, resample=2, **half),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=256,
    )
    head = text[0] // text[2]
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    }
    llm = text_config(
        tokenizer,
        text,
        model_type="gemma3_text",
        max_position_embeddings=131072,
        num_key_value_heads=1,
        head_dim=head,
        query_pre_attn_scalar=head,
        sliding_window=1024,
        rope_parameters=rope,
    )
    ids = {
        f"{k}_token_index": tokenizer.convert_tokens_to_ids(t) for k, t in zip(("boi", "eoi"), IMAGE_TOKENS.values())
    }
    config = transformers.Gemma3Config(
        text_config=llm,
        vision_config=vision_config(
            "siglip_vision_model", vision, image_size=896, patch_size=14, vision_use_head=False
        ),
        mm_tokens_per_image=256,
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        **ids,
        **token_ids(tokenizer),
    )
    return config, processor
