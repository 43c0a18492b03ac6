"""InternVL3 and InternVL3.5 in the transformers format (OpenGVLab/InternVL3-1B-hf, -2B-hf, -8B-hf, the
InternVL3.5 -HF checkpoints; model type internvl): InternViT tiles of 448 px plus a thumbnail, each tile's
32x32 patches folded 2x2 into 256 tokens by pixel shuffle, then a 2-layer MLP into a Qwen2.5 (InternVL3) or
Qwen3 (InternVL3.5) LLM.

The processor (GotOcr2's image processor, InternVL's dynamic preprocessing) picks the grid of C x R tiles,
1 to 12 of them, whose aspect ratio is closest to the image's (on a tie, more tiles while the image has
more than half their area), resizes the image to exactly 448C x 448R and cuts it into the tiles, row by
row, then adds the whole image squashed to one tile, last; an image that gets a single tile (a 1 x 1 grid)
gets no thumbnail, that tile is the whole image. The prompt has `<img>`, 256 `<IMG_CONTEXT>` tokens a tile,
`</img>` (one pair around all the tiles of the image: those two are text tokens, not visual tokens).
Partitions in LLM order: "tile 0,0", "tile 0,1", ... row by row, then "global", the thumbnail, beside the
high-resolution tiles as LLaVA-NeXT's base image is (HiRED's setting; GlobalCom2 runs too); a single-tile
image is one "global" partition. Each tile's token (i, j) is the cell of its 16x16 grid the model's own
`pixel_shuffle` folds it from (read off it, run on patch indices), and its box is that cell of the tile's
part of the image (a tile shows exactly 1/C x 1/R of the image).

Signals. InternViT has a [CLS] token (the class embedding of its embeddings, with a position of its own),
which runs through every layer with the patches; the LLM receives the last layer's output without it (the
"default" strategy drops row 0 after the encoder). So the "cls" signals are [CLS]'s own attention to the
1024 patches of each tile, recomputed from the layer's queries and keys as on CLIP; the hooks read the
queries and keys after `q_norm` and `k_norm` (identities on InternViT-300M, the 1B to 8B checkpoints'; RMS
norms where `use_qk_norm`), as the attention uses them. A token folds 2x2 patches: its attention and keys are
the mean of its four patches', its "hidden" their outputs side by side in the order the projector takes them
(the pixel shuffle's); every signal exists, but no token is one patch, so the methods that merge patches
inside the encoder (tome-vit) and the official-code variants that read every encoder position ("padded"
signals: HiRED's, VisionZip's and VisPruner's `paper_code`) are refused with the reason.

Inside the LLM: Qwen2's attention (InternVL3); Qwen3's normalises each head's queries and keys before RoPE
(InternVL3.5), which the hooks that score tokens do as well. Positions are the plain 1-D ones.

A clip (`prepare_video`) goes through the checkpoint's own video processor (InternVLVideoProcessor) on exactly
the frames given: each frame squashed to one 448-px tile (never split, no thumbnail), 256 tokens after the
pixel shuffle, as an image that gets a single tile. The prompt numbers the frames, each one's tokens between
their own `<img>` and `</img>`: "Frame1: <img>...</img>\nFrame2: <img>...</img>\n" and then the text, as
OpenGVLab's own video evaluation writes it (internvl_chat/eval/mvbench/evaluate_mvbench.py, `__getitem__`:
"Frame{i}: <image>" lines, each frame one 448-px patch); it says no time. To the model the frames are images:
their tokens are `<IMG_CONTEXT>` (InternVL has no video token), their pixels join `pixel_values`, one tile a
frame, and the LLM reads them one frame after another. Partitions are the frames ("frame 0", "frame 1", ...),
each a 16x16 grid over the whole frame, like a single-tile image's "global".
"""

from __future__ import annotations

import dataclasses

import torch
import transformers

from .base import Backend
from .errors import ExplorerError
from .geometry import Geometry, Prepared, Times, check_clip, clip_prepared
from .llm_prune import Decoder
from .random_models import build_tokenizer, text_config, token_ids
from .signals import Taps

DEFAULT = "OpenGVLab/InternVL3-1B-hf"
QK_NORM_LLMS = ("qwen3", "qwen3_moe")  # InternVL3.5's LLMs normalise queries and keys per head
INTERNVIT = Taps("attention", "q_norm", "k_norm")  # its attention normalises q and k after projecting them


class InternVL(Backend):
    model_type = "internvl"
    family = "InternVL3"
    model_class = "InternVLForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    thumbnail = True
    cls_token = True  # first in every tile
    taps = INTERNVIT

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default" or cfg.vision_feature_layer != -1:
            raise ExplorerError(f"{name}: only InternVL's last vision layer without its [CLS] token is supported")
        if cfg.text_config.model_type not in ("qwen2", "qwen3", "qwen3_moe", "llama"):
            raise ExplorerError(
                f"{name}: a {cfg.text_config.model_type} LLM is not supported; Qwen2, Qwen3 and Llama are"
            )
        v = cfg.vision_config
        self.patches = v.image_size[0] // v.patch_size[0]  # per tile side (32)
        self.scale = round(1 / cfg.downsample_ratio)  # patches folded per token side (2)
        self.side = self.patches // self.scale  # tokens per tile side (16)
        self.encoder = model.model.vision_tower.encoder.layer
        self.feature_layer = len(self.encoder) - 1  # its output (through `layernorm`, an identity with mean pooling)

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the tiles the processor cuts an image of (height, width) into; (0, 0) for none (the
        image is one tile, the whole of it)."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        tile = (ip.size["height"], ip.size["width"])
        cols, rows = get_optimal_tiled_canvas((height, width), tile, ip.min_patches, ip.max_patches)
        return (rows, cols) if rows * cols > 1 and ip.max_patches > 1 else (0, 0)

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels; no token is a single patch, so no source row."""
        height, width = image_size
        rows, cols = self.tiles(height, width)
        boxes = []
        for r in range(rows):
            for c in range(cols):  # tile (r, c) shows exactly 1/rows x 1/cols of the image
                region = (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
                boxes.append(self.boxes(region))
        boxes.append(self.boxes((0, 0, width, height)))  # the thumbnail (or the single tile), last
        names = (*(f"tile {r},{c}" for r in range(rows) for c in range(cols)), "global")
        n = self.side**2
        partition = torch.arange(len(names)).repeat_interleave(n)
        cells = torch.stack(self.cells(), 1).repeat(len(names), 1)
        geometry = Geometry(names, partition, cells, torch.cat(boxes).float(), (width, height))
        return geometry, torch.full((len(partition),), -1)

    def visual_token_id(self, prepared: Prepared) -> int:
        """The image token: a clip's frames are images to InternVL."""
        return self.image_token_id

    def prepare_video(self, frames: list, prompt: str, times_s: Times = None, duration_s: float = 0.0) -> Prepared:
        """Chat template with one video part + the checkpoint's video processor on exactly these PIL frames
        (`do_sample_frames=False`: it samples none of its own), and the clip's geometry. InternVL's prompt
        numbers the frames but does not say when they were taken: `times_s` is only checked, `duration_s` unused."""
        check_clip(frames, times_s)
        text = self.chat(prompt, part="video")
        inputs = self.processor(videos=[frames], text=text, return_tensors="pt", do_sample_frames=False)
        layout = self.video_layout(len(frames), frames[0].size)
        return clip_prepared(inputs.to(self.device), layout, self.image_token_id)

    def video_layout(self, frames: int, size: tuple[int, int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of a clip of `frames` frames of `size` (width, height) pixels: each frame one tile over the
        whole frame, its tokens the cells of a 16x16 grid as the pixel shuffle folds them; no token is a single
        patch, so no source row."""
        width, height = size
        names = tuple(f"frame {f}" for f in range(frames))
        partition = torch.arange(frames).repeat_interleave(self.side**2)
        cells = torch.stack(self.cells(), 1).repeat(frames, 1)
        boxes = self.boxes((0, 0, width, height)).float().repeat(frames, 1)
        return Geometry(names, partition, cells, boxes, (width, height)), torch.full((len(partition),), -1)

    def cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) row and (T,) column of each token of a tile in its side x side grid, in LLM order: read off
        the model's own pixel shuffle, run on patch indices."""
        index = torch.arange(self.patches**2, dtype=torch.float64).view(1, -1, 1)
        folded = self.folded(index)[:, :, 0].long()  # (T, s * s) the patches each token folds
        i, j = folded // self.patches // self.scale, folded % self.patches // self.scale
        assert (i == i[:, :1]).all() and (j == j[:, :1]).all(), "a token folds a square block of patches"
        return i[:, 0], j[:, 0]

    def boxes(self, region: tuple[float, float, float, float]) -> torch.Tensor:
        """(T, 4) float64 pixel boxes of a tile's tokens, in LLM order, when the tile shows `region` (x0, y0,
        x1, y1) of the image."""
        x0, y0, x1, y1 = region
        i, j = self.cells()
        n, f64 = self.side, torch.float64
        ys, xs = torch.linspace(y0, y1, n + 1, dtype=f64), torch.linspace(x0, x1, n + 1, dtype=f64)
        return torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]], 1)

    def folded(self, values: torch.Tensor) -> torch.Tensor:
        """(tiles, patches, C) -> (tiles * tokens, s * s, C): each token's patches, as the model's pixel shuffle
        folds them (the order its projector takes them in)."""
        tiles, _, channels = values.shape
        grid = values.reshape(tiles, self.patches, self.patches, channels).contiguous()  # as get_image_features
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=1 / self.scale)  # (tiles, n, n, s * s * C)
        return shuffled.reshape(tiles * self.side**2, self.scale**2, channels)

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=prepared.inputs["pixel_values"], return_dict=True)
        return out.pooler_output.flatten(0, 1)  # (tiles * 256, D)

    def crops(self, prepared: Prepared) -> torch.Tensor:
        return prepared.inputs["pixel_values"]  # (tiles, 3, 448, 448), the thumbnail last; a clip's: (F, 3, 448, 448)

    def encoder_sequences(self, prepared: Prepared) -> list[int]:
        """Every tile and the thumbnail (a clip: every frame), patches x patches each ([CLS] not counted),
        attended over alone."""
        return [self.patches**2] * len(self.crops(prepared))

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        tiles, patches, *rest = values.shape
        folded = self.folded(values.reshape(tiles, patches, -1))  # (N, s * s, C)
        return folded.mean(1).view(-1, *rest) if fold == "mean" else folded.flatten(1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, s * s * C) folded last-layer outputs -> the vision tower's final norm on each patch (an identity
        on the checkpoints, which mean-pool), then the projector (layer norm, linear, GELU, linear)."""
        normed = self.model.model.vision_tower.layernorm(hidden.view(len(hidden), self.scale**2, -1))
        return self.model.model.multi_modal_projector(normed.flatten(1))

    def encoder_outputs(self, prepared: Prepared, kept: torch.Tensor) -> dict:
        """generate()'s `mm_encoder_outputs` for (K, D) kept tokens: one (1, K, D) tensor, as InternVL takes them."""
        return {"image": transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=kept[None])}

    def batch_inputs(self, each: list[dict]) -> dict:
        """As every family's, with the images' kept tokens joined into one (1, K1 + K2 + ..., D) tensor."""
        batch = super().batch_inputs(each)
        joined = batch["mm_encoder_outputs"]["image"].pooler_output  # a (K, D) tensor per image
        output = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=torch.cat(joined)[None])
        return batch | {"mm_encoder_outputs": {"image": output}}

    def decoder(self, positions=None) -> Decoder:
        """As every family's; InternVL3.5's Qwen3 LLMs normalise each head's queries and keys before RoPE."""
        qk_norm = self.model.config.text_config.model_type in QK_NORM_LLMS
        return dataclasses.replace(super().decoder(positions), qk_norm=qk_norm)


# Random-weight models with InternVL3-1B-hf's processor geometry and its LLM's depth and positions (Qwen2.5-0.5B:
# 24 layers, 32768 positions) at tiny widths: token counts and overlays are real, answers are gibberish.
RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp), and the LLM's max_position_embeddings
    "tiny-internvl3": ((32, 4, 4, 64), (32, 24, 4, 64), 32768),
}
# InternVL3-1B-hf's chat template (tests/mirrors/OpenGVLab--InternVL3-1B-hf): no system turn; an image part is
# "<IMG_CONTEXT>\n", which the processor expands to <img>, 256 <IMG_CONTEXT> a tile, </img>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
# InternVL3-1B-hf's video processor (tests/mirrors/, its SOURCES.md): every frame squashed to one 448-px tile,
# bicubic, ImageNet's mean and std, as the image processor's tiles
VIDEO = {"size": {"height": 448, "width": 448}, "resample": 3, **IMAGENET}
MARKERS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with InternVL3-1B-hf's processor geometry
    (448-px tiles, 1 to 12 of them plus the thumbnail, ImageNet mean and std, bicubic; 256 tokens a tile), its
    video processor (VIDEO: a frame one tile) and its model's settings (patch 14, downsample ratio 0.5, GELU
    projector, the last layer without [CLS])."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    (v_hidden, v_layers, v_heads, v_mlp), text, positions = RANDOM[name]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MARKERS.values(), "<video>"]
    tokenizer = build_tokenizer(
        specials,
        "system user assistant What is shown in this image? Describe the photo.",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=MARKERS | {"video_token": "<video>"},
    )
    tile = {"height": 448, "width": 448}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, min_patches=1, max_patches=12, **IMAGENET),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(**VIDEO),
        image_seq_length=256,
        chat_template=CHAT_TEMPLATE,
    )
    vision = dict(hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads)
    vision |= dict(intermediate_size=v_mlp, image_size=[448, 448], patch_size=[14, 14], attention_bias=True)
    config = InternVLConfig(
        text_config=text_config(
            tokenizer, text, max_position_embeddings=positions, model_type="qwen2", num_key_value_heads=2
        ),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        **token_ids(tokenizer),
    )
    return config, processor
