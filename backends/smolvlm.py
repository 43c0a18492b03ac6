"""SmolVLM (HuggingFaceTB checkpoints, Idefics3 family): 512-px tiles of the image plus a global tile,
each 1024 SigLIP patches folded 4x4 into 64 tokens by pixel shuffle.

The processor resizes the image so that its longer side is 4 * 512 px (small images are upscaled),
then stretches each side up to a multiple of 512 and cuts it into R x C tiles, and adds the whole image
squashed to 512x512. Visual tokens in LLM order: tile 1,1's 64 tokens, tile 1,2's, ... row by row
("tile R,C", 0-based), then the global tile's ("global"); the text tokens around them (tile
markers, newlines) are not visual tokens. Each token is an 8x8 cell of its tile, 64x64 px of it;
which 16 patches a token folds is read off the model's own `pixel_shuffle`, run on patch indices.

SigLIP has no [CLS] token: the "cls" signals are the attention each patch receives (see
`signals.attention_maps`), averaged over the 16 patches of a token, as the LightCompress port averages
folded patches; keys too are averaged, and "hidden" holds a token's 16 patches side by side, as the
projector takes them (the encoder's final norm, then the linear projection, is the projector here).
"""

from __future__ import annotations

import torch

from .base import Backend, image_only, image_only_processor
from .geometry import Geometry, Prepared
from .random_models import build_tokenizer, text_config, token_ids, vision_config

DEFAULT = "HuggingFaceTB/SmolVLM-256M-Instruct"  # the smallest; the default without a GPU


class SmolVLM(Backend):
    model_type = "smolvlm"
    family = "SmolVLM"
    model_class = "SmolVLMForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    thumbnail = True
    cls_token = False

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        self.patches = cfg.vision_config.image_size // cfg.vision_config.patch_size  # per tile side (32)
        self.scale = cfg.scale_factor  # patches folded per token side (4)
        self.side = self.patches // self.scale  # tokens per tile side (8)
        self.encoder = model.model.vision_model.encoder.layers
        self.feature_layer = len(self.encoder) - 1  # its output, through the final norm, is projected

    @classmethod
    def load_processor(cls, path: str, **hub):
        from transformers import SmolVLMProcessor

        return image_only_processor(SmolVLMProcessor, path, **hub)

    def folded(self, values: torch.Tensor) -> torch.Tensor:
        """(tiles, patches, C) -> (tiles * tokens, folded patches, C), as the model's pixel shuffle folds them."""
        tiles, _, channels = values.shape
        shuffled = self.model.model.connector.pixel_shuffle(
            values.contiguous(), self.scale
        )  # (tiles, tokens, folded * C)
        return shuffled.reshape(tiles * shuffled.shape[1], -1, channels)

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels; no token is a single patch, so no source row."""
        height, width = image_size
        _, rows, cols = self.processor.image_processor.get_number_of_image_patches(height, width)
        index = torch.arange(self.patches**2, dtype=torch.float64).view(1, -1, 1)
        folded = self.folded(index)[:, :, 0].long()  # (64, 16) the patches each token of a tile folds
        i, j = folded // self.patches // self.scale, folded % self.patches // self.scale  # (64, 16) token cells
        assert (i == i[:, :1]).all() and (j == j[:, :1]).all(), "a token folds a square block of patches"
        i, j = i[:, 0], j[:, 0]  # (64,)
        n, f64 = self.side, torch.float64
        boxes = []
        ys, xs = torch.linspace(0, height, rows * n + 1, dtype=f64), torch.linspace(0, width, cols * n + 1, dtype=f64)
        for r in range(rows):
            for c in range(cols):  # tile (r, c) shows 1/rows x 1/cols of the (stretched) image
                y, x = r * n + i, c * n + j
                boxes.append(torch.stack([xs[x], ys[y], xs[x + 1], ys[y + 1]], 1))
        ys, xs = torch.linspace(0, height, n + 1, dtype=f64), torch.linspace(0, width, n + 1, dtype=f64)
        boxes.append(torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]], 1))  # the global tile, last
        names = (*(f"tile {r},{c}" for r in range(rows) for c in range(cols)), "global")
        partition = torch.arange(len(names)).repeat_interleave(n * n)
        cells = torch.stack([i, j], 1).repeat(len(names), 1)
        geometry = Geometry(names, partition, cells, torch.cat(boxes).float(), (width, height))
        return geometry, torch.full((len(partition),), -1)

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        inputs = prepared.inputs
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            return_dict=True,
        )
        return out.pooler_output[0]  # (N, D)

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        tiles, patches, *rest = values.shape
        folded = self.folded(values.reshape(tiles, patches, -1))  # (N, 16, C)
        return folded.mean(1).view(-1, *rest) if fold == "mean" else folded.flatten(1)

    @property
    def language_model(self):
        return self.model.model.text_model

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, 16 * C) folded encoder outputs -> the final norm on each patch, then the projection."""
        normed = self.model.model.vision_model.post_layernorm(hidden.view(len(hidden), self.scale**2, -1))
        return self.model.model.connector.modality_projection(normed.flatten(1))


RANDOM = {"tiny-smolvlm": ((32, 3, 4, 64), (32, 4, 4, 64))}  # name -> (vision, text): hidden, layers, heads, mlp
CHAT_TEMPLATE = (  # SmolVLM-256M-Instruct's
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with SmolVLM-256M-Instruct's processor
    geometry: longer side 2048 px, 512-px tiles and a global one, patch 16, 4x4 pixel shuffle."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessorPil, SmolVLMProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    vision, text = RANDOM[name]
    markers = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>"]
    tokenizer = build_tokenizer(
        [*specials, "<global-img>", *markers],
        "User: Assistant: What is shown in this image? Describe the photo, the chart and the text in it.",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 2048},
        max_image_size={"longest_edge": 512},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = image_only(SmolVLMProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),  # never used: see `base.image_only`
        image_seq_len=64,
        chat_template=CHAT_TEMPLATE,
    )
    config = SmolVLMConfig(
        text_config=text_config(tokenizer, text, model_type="llama"),
        vision_config=vision_config("smolvlm_vision", vision, image_size=512, patch_size=16),
        scale_factor=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **token_ids(tokenizer),
    )
    return config, processor
