"""LLaVA-1.5 (llava-hf checkpoints): one 336-px CLIP view of the image, 24x24 = 576 visual tokens,
the baseline most token-reduction papers report.

llava-hf's processor resizes the image's shorter side to 336 px and cuts the central 336x336 square
out of it, so the tokens cover that square of the user's image (all of it when the image is square):
one partition, "image", its 24x24 grid in raster order, each token's box the part of the original
image its 14-px patch shows. The encoder is CLIP with a [CLS] token, as in LLaVA-NeXT.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from .base import Backend
from .errors import ExplorerError
from .geometry import Geometry, Prepared
from .random_models import VICUNA, llama_tokenizer, text_config, token_ids, vision_config

DEFAULT = "llava-hf/llava-1.5-7b-hf"


class Llava(Backend):
    model_type = "llava"
    family = "LLaVA-1.5"
    model_class = "LlavaForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    projects_kept = True

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default" or cfg.vision_config.model_type != "clip_vision_model":
            raise ExplorerError(f"{name}: only LLaVA-1.5 checkpoints (CLIP, 'default' feature strategy) are supported")
        self.patch = cfg.vision_config.patch_size  # 14 px
        self.side = cfg.vision_config.image_size // self.patch  # tokens per side (24)
        self.encoder = model.model.vision_tower.encoder.layers
        vfl = cfg.vision_feature_layer  # hidden_states index; the layer that makes it is one below
        self.feature_layer = len(self.encoder) + vfl if vfl < 0 else vfl - 1

    @classmethod
    def load_processor(cls, path: str, **hub):
        return llava_processor(path, **hub)

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels, and each token's row in the encoder output."""
        height, width = image_size
        ip, g = self.processor.image_processor, self.side
        if ip.size.get("shortest_edge"):  # the shorter side to that many pixels, the aspect ratio kept
            shape = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))
            new_h, new_w = transformers.image_transforms.get_resize_output_image_size(
                shape, ip.size["shortest_edge"], default_to_square=False, input_data_format="channels_first"
            )
        else:
            new_h, new_w = ip.size["height"], ip.size["width"]
        top, left = 0, 0
        if ip.do_center_crop:
            top, left = (new_h - ip.crop_size["height"]) // 2, (new_w - ip.crop_size["width"]) // 2
        cell = torch.arange(g * g)
        i, j = cell // g, cell % g
        y = (top + torch.arange(g + 1) * self.patch) * height / new_h  # (g + 1,) row edges on the image
        x = (left + torch.arange(g + 1) * self.patch) * width / new_w
        boxes = torch.stack([x[j], y[i], x[j + 1], y[i + 1]], 1).clamp(min=0)
        boxes = torch.minimum(boxes, torch.tensor([width, height, width, height]))
        geometry = Geometry(
            ("image",), torch.zeros(g * g, dtype=torch.long), torch.stack([i, j], 1), boxes, (width, height)
        )
        return geometry, cell

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=prepared.inputs["pixel_values"], return_dict=True)
        return out.pooler_output[0]  # (N, D)

    def crops(self, prepared: Prepared) -> torch.Tensor:
        return prepared.inputs["pixel_values"]  # (1, 3, 336, 336)


def llava_processor(path: str, **hub):
    """The llava-hf processor saved at `path` (LLaVA-1.5 and LLaVA-NeXT). Without a processor_config.json
    (llava-v1.6-vicuna-7b-hf may have none on the Hub) transformers 5 leaves the processor without the patch
    size, the feature strategy and the [CLS] token it counts image tokens with; they are then read from the
    model's config, as transformers 4 read them from the model: a CLIP tower adds its [CLS] token, which the
    'default' strategy drops again."""
    processor = transformers.AutoProcessor.from_pretrained(path, **hub)
    if processor.patch_size is not None:
        return processor
    cfg = transformers.AutoConfig.from_pretrained(path, **hub)
    return transformers.AutoProcessor.from_pretrained(
        path,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=int(cfg.vision_config.model_type == "clip_vision_model"),
        **hub,
    )


RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp), LLM positions: tiny widths, and the
    # LLM depth and positions of the checkpoint it follows (backends/configs/, tests/mirrors/)
    "tiny-llava-1.5": ((32, 3, 4, 64), (32, 32, 4, 64), 4096),  # llava-1.5-7b-hf: 32 layers, 4096 positions
}


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with llava-1.5-7b-hf's processor geometry
    (shorter side to 336 px, central 336x336 crop, patch 14)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

    vision, text, positions = RANDOM[name]
    tokenizer = llama_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA,
    )
    config = LlavaConfig(
        text_config=text_config(tokenizer, text, positions, model_type="llama"),
        vision_config=vision_config("clip_vision_model", vision, image_size=336, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **token_ids(tokenizer),
    )
    return config, processor
