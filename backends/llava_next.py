"""LLaVA-NeXT (LLaVA-1.6, llava-hf checkpoints): a CLIP thumbnail of the whole image plus AnyRes crops.

Visual tokens in LLM order: the 24x24 thumbnail ("base"), then the crops stitched into one grid,
unpadded to the image's aspect ratio and read row by row, each row closed by a newline token.
Geometry is read off the model's own `pack_image_features`, run on token indices instead of
features, so it always matches the sequence the LLM receives.
"""

from __future__ import annotations

import torch

from .base import Backend
from .errors import ExplorerError
from .geometry import Prepared, anyres_layout
from .llava import llava_processor
from .random_models import VICUNA, llama_tokenizer, text_config, token_ids, vision_config

DEFAULT = "llava-hf/llava-v1.6-vicuna-7b-hf"  # the HiRED paper's model


class LlavaNext(Backend):
    model_type = "llava_next"
    family = "LLaVA-NeXT"
    model_class = "LlavaNextForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    thumbnail = True
    projects_kept = True

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default":
            raise ExplorerError(f"{name}: only the 'default' vision feature strategy of LLaVA-NeXT is supported")
        self.tile, self.patch = cfg.vision_config.image_size, cfg.vision_config.patch_size  # 336, 14 px
        self.encoder = model.model.vision_tower.encoder.layers
        vfl = cfg.vision_feature_layer  # hidden_states index; the layer that makes it is one below
        self.feature_layer = len(self.encoder) + vfl if isinstance(vfl, int) and vfl < 0 else vfl - 1

    @classmethod
    def load_processor(cls, path: str, **hub):
        return llava_processor(path, **hub)

    def layout(self, image_size: list[int]):
        """Geometry of an image of (height, width) pixels, and each token's row in the flat encoder output."""
        height, width = image_size

        def pack(fields, newline):
            (packed,), _ = self.model.model.pack_image_features([fields], [(height, width)], "default", newline)
            return packed

        cfg = self.model.config
        return anyres_layout(
            pack, modeling_llava_next().unpad_image, image_size, cfg.image_grid_pinpoints, self.tile, self.patch
        )

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        inputs = prepared.inputs
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        )
        return out.pooler_output[0]  # (N, D)

    def crops(self, prepared: Prepared) -> torch.Tensor:
        crops = len(prepared.geometry.names) - 1  # the thumbnail and the crops: every partition but the newlines
        return prepared.inputs["pixel_values"][0, :crops]


def modeling_llava_next():
    from transformers.models.llava_next import modeling_llava_next

    return modeling_llava_next


# Random-weight models with the llava-hf 1.6 processor geometry (336-px crops, patch 14, the llava-hf
# grid pinpoints): token counts and overlays are real, answers are gibberish.
RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp), LLM positions
    # tests and the offline smoke run: tiny widths, llava-v1.6-vicuna-7b-hf's LLM depth and positions (32, 4096)
    "tiny-llava-next": ((32, 3, 4, 64), (32, 32, 4, 64), 4096),
    "small-llava-next": ((256, 8, 8, 1024), (512, 8, 8, 1408), 4096),  # CPU benchmarks: a mid-size stand-in
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def random_parts(name: str):
    """The config and processor of the random-weight model `name` (a key of RANDOM)."""
    from transformers import LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    vision, text, positions = RANDOM[name]
    tokenizer = llama_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        chat_template=VICUNA,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        text_config=text_config(tokenizer, text, positions, model_type="llama"),
        vision_config=vision_config("clip_vision_model", vision, image_size=336, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **token_ids(tokenizer),
    )
    return config, processor
