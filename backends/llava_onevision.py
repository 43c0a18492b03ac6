"""LLaVA-OneVision (llava-hf checkpoints): a SigLIP thumbnail of the whole image plus AnyRes crops, as
LLaVA-NeXT, with 729 (27x27) tokens per 384-px crop and no [CLS] token.

Visual tokens in LLM order: the 27x27 thumbnail ("base"), then the crops stitched into one grid,
unpadded to the image's aspect ratio and read row by row, each row closed by a newline token. When
that grid holds more than 9 crops' worth of tokens ("anyres_max_9"), the model resizes it
bilinearly to about 9 crops' worth: each token then samples the grid between several patches, its
box is the part of the image its cell of the smaller grid covers, and it belongs to the crop that
holds its centre. Geometry is read off the model's own `pack_image_features`, so it follows the
downsampled grid exactly.

SigLIP has no [CLS] token: the "cls" signals are the attention each patch receives (see
`signals.attention_maps`). Signals of resampled tokens are resampled the same way, by the model's own
packing code, so they line up with the features; merging methods mix those resampled encoder outputs
before the projector.

A clip (`prepare_video`; the LLaVA-Video checkpoints share the model type): the checkpoint's video
processor squashes every frame to one 384-px square, the encoder sees each, the projector maps its
27x27 patches, and the model pools them bilinearly to 14x14 (`apply_pooling`); the frames' tokens follow
one another, row by row, and one newline token closes the clip: F * 196 + 1 video tokens. Partitions are
the frames. Signals are pooled by the same `apply_pooling`, so they line up with the tokens; no token is
one patch, so the projector runs on every token (`one_patch_each` is False).
"""

from __future__ import annotations

import math

import torch
import transformers  # lazy: its model code loads on first use

from .base import Backend
from .errors import ExplorerError
from .geometry import Geometry, Prepared, Times, anyres_layout, check_clip, clip_layout, clip_prepared
from .random_models import build_tokenizer, text_config, token_ids, vision_config

DEFAULT = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"  # 7B: llava-hf/llava-onevision-qwen2-7b-ov-hf


class LlavaOnevision(Backend):
    model_type = "llava_onevision"
    family = "LLaVA-OneVision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    thumbnail = True
    cls_token = False
    projects_kept = True  # on images whose grid is not resampled

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "full" or not isinstance(cfg.vision_feature_layer, int):
            raise ExplorerError(f"{name}: only the 'full' vision feature strategy of one layer is supported")
        self.tile, self.patch = cfg.vision_config.image_size, cfg.vision_config.patch_size  # 384, 14 px
        self.encoder = model.model.vision_tower.encoder.layers
        vfl = cfg.vision_feature_layer  # hidden_states index; the layer that makes it is one below
        self.feature_layer = len(self.encoder) + vfl if vfl < 0 else vfl - 1

    def layout(self, image_size: list[int]):
        """Geometry of an image of (height, width) pixels, and each token's row in the flat encoder
        output (-1 where the grid was resampled)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

        cfg = self.model.config
        return anyres_layout(
            self.packer(image_size), unpad_image, image_size, cfg.image_grid_pinpoints, self.tile, self.patch
        )

    def packer(self, image_size: list[int]):
        """The model's packing for an image of (height, width): (crops, g*g, C) values, (C,) newline -> (N, C)."""

        def pack(values: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
            (packed,), _ = self.model.model.pack_image_features(
                [values], [tuple(image_size)], newline, self.model.config.vision_aspect_ratio
            )
            return packed

        return pack

    def one_patch_each(self, prepared: Prepared) -> bool:
        g = prepared.geometry
        return bool((prepared.source[g.partition != g.names.index("newline")] >= 0).all())  # -1: resampled, pooled

    def crops(self, prepared: Prepared) -> torch.Tensor:
        """(crops, 3, H, W) the thumbnail and the crops of an image; (F, 3, H, W) the frames of a clip."""
        if prepared.video:
            return prepared.inputs["pixel_values_videos"][0]
        crops = len(prepared.geometry.names) - 1  # the thumbnail and the crops: every partition but the newlines
        return prepared.inputs["pixel_values"][0, :crops]

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        """(N, D) the projected visual tokens, in LLM order, of an image or a clip, by the model's own code."""
        inputs = prepared.inputs
        if prepared.video:
            out = self.model.model.get_video_features(
                pixel_values_videos=inputs["pixel_values_videos"], return_dict=True
            )
            return out.pooler_output[0]  # (F * 196 + 1, D): pooled frames, then the newline
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        )
        return out.pooler_output[0]  # (N, D)

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        """(crops, T, ...) per-patch values through the model's own packing: unpadded, resampled where the
        features are, NaN for newlines; a clip's (frames, T, ...) through its own pooling, as its features.
        Every token gets the resampled value of its patches, whatever `fold` asks, as the features do."""
        crops, t, *rest = values.shape
        flat = values.reshape(crops, t, -1)  # (crops, T, C)
        newline = flat.new_full((1, flat.shape[-1]), math.nan)
        if prepared.video:
            pooled = self.model.model.apply_pooling(flat).flatten(0, 1)  # (F * p*p, C)
            return torch.cat([pooled, newline]).view(-1, *rest)  # (N, ...)
        width, height = prepared.geometry.image_size
        return self.packer([height, width])(flat, newline[0]).view(-1, *rest)  # (N, ...)

    def encoder_outputs(self, prepared: Prepared, kept: torch.Tensor) -> dict:
        """generate()'s `mm_encoder_outputs` for (K, D) kept tokens: a clip's as get_video_features gives them."""
        if not prepared.video:
            return super().encoder_outputs(prepared, kept)
        return {"video": transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=kept[None])}

    def prepare_video(self, frames: list, prompt: str, times_s: Times = None, duration_s: float = 0.0) -> Prepared:
        """Chat template with one video part + the checkpoint's video processor on exactly these PIL frames
        (`do_sample_frames=False`: it samples none of its own), and the geometry of the clip's tokens.
        OneVision's prompt does not say when the frames were taken: `times_s` is only checked, `duration_s` unused."""
        check_clip(frames, times_s)
        text = self.chat(prompt, part="video")
        inputs = self.processor(videos=[frames], text=text, return_tensors="pt", do_sample_frames=False)
        layout = self.video_layout(len(frames), frames[0].size)
        return clip_prepared(inputs.to(self.device), layout, self.model.config.video_token_id)

    def video_layout(self, frames: int, size: tuple[int, int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of a clip of `frames` frames of `size` (width, height) pixels, without running the model,
        and each token's encoder row: -1 for all (pooled from several patches). Where each pooled token
        samples its frame is read off the model's own `apply_pooling`, run on the patches' (row, column)."""
        g = self.tile // self.patch  # patches a side
        k = torch.arange(g * g, dtype=torch.float64)
        field = torch.stack([k // g, k % g], -1)[None]  # (1, g*g, 2) each patch's (row, column)
        pooled = self.model.model.apply_pooling(field)[0]  # (p*p, 2)
        geometry = clip_layout(frames, size, pooled, self.tile, self.patch)
        return geometry, torch.full((len(geometry),), -1)


RANDOM = {  # name -> (vision, text): hidden, layers, heads, mlp; LLM positions
    # tests and the offline smoke run: tiny widths, llava-onevision-qwen2-0.5b-ov-hf's LLM depth and positions
    "tiny-llava-onevision": ((32, 3, 4, 64), (32, 24, 4, 64), 32768),
    "small-llava-onevision": ((256, 8, 8, 1024), (512, 8, 8, 1408), 4096),  # CPU video benchmarks, as small-llava-next
}
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # llava-onevision-qwen2-*-ov-hf's 36
CHATML = (  # the chat template of llava-onevision-qwen2-*-ov-hf as the Hub has it now (tests/mirrors): images,
    # then videos, then the text: "<|im_start|>user <image>\nQ<|im_end|><|im_start|>assistant\n"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{{ '<video>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ '\n' + part['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# llava-onevision-qwen2-0.5b-ov-hf's video processor settings (tests/mirrors/: its SOURCES.md): SigLIP's
# mean and std, every frame squashed to 384x384 with bicubic resampling; transformers reads them from its
# preprocessor_config.json, as the Hub repo keeps them again in video_processor/preprocessor_config.json
VIDEO = {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with llava-onevision-qwen2-0.5b-ov-hf's
    processor geometry: 384-px crops, patch 14, its 36 pinpoints, anyres_max_9, 729 tokens per crop; and
    its video processor (VIDEO)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    vision, text, positions = RANDOM[name]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = build_tokenizer(
        specials,
        CORPUS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=PINPOINTS,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**VIDEO),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        chat_template=CHATML,
        vision_aspect_ratio="anyres_max_9",
    )
    config = LlavaOnevisionConfig(
        text_config=text_config(tokenizer, text, positions, model_type="qwen2"),
        vision_config=vision_config(
            "siglip_vision_model", vision, image_size=384, patch_size=14, vision_use_head=False
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        **token_ids(tokenizer),
    )
    return config, processor


CORPUS = "user assistant What is shown in this image? Describe the photo, the chart and the text in it."
