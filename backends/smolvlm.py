"""SmolVLM and Idefics3 (HuggingFaceTB and HuggingFaceM4 checkpoints): tiles of the image plus a
global tile, each tile's SigLIP patches folded scale x scale into one token by pixel shuffle.

Two kinds of checkpoint share this geometry: `idefics3` (SmolVLM-256M/500M-Instruct, SmolVLM-Instruct,
Idefics3-8B-Llama3; Idefics3ForConditionalGeneration and Idefics3Processor) and `smolvlm` (the
SmolVLM2 checkpoints; SmolVLMForConditionalGeneration and SmolVLMProcessor, video included). Their
sizes come from the checkpoint: SmolVLM-256M has 512-px tiles of 32x32 patches of 16 px folded 4x4 into
64 tokens (`scale_factor` 4); SmolVLM-Instruct 384-px tiles of 27x27 patches folded 3x3 into 81;
Idefics3-8B 364-px tiles of 26x26 folded 2x2 into 169.

The processor resizes the image so that its longer side is `size["longest_edge"]` (2048 px on
SmolVLM-256M; small images are upscaled), then stretches each side up to a multiple of the tile
(`max_image_size`) and cuts it into R x C tiles, and adds the whole image squashed to one tile.
Visual tokens in LLM order: tile 1,1's tokens, tile 1,2's, ... row by row ("tile R,C", 0-based),
then the global tile's ("global"); the text tokens around them (tile markers, newlines) are not
visual tokens. Each token is a cell of its tile's side x side grid; which patches a token folds is
read off the model's own `pixel_shuffle`, run on patch indices.

SigLIP has no [CLS] token: the "cls" signals are the attention each patch receives (see
`signals.attention_maps`), averaged over the patches of a token, as the LightCompress port averages
folded patches; keys too are averaged, and "hidden" holds a token's patches side by side, as the
projector takes them (the encoder's final norm, then the linear projection, is the projector here).

A clip (SmolVLM2's `prepare_video`) goes through the checkpoint's own video processor
(SmolVLMVideoProcessor) on exactly the frames given: each frame is resized, keeping its aspect, then
squashed to one tile (`max_image_size`), never split into tiles, and the prompt says how many frames a
video of how long holds and, before each frame's tokens, its time ("Frame from 00:03:"). The frames' tokens
are image tokens (SmolVLM has no video token), a tile's worth a frame, one frame after another; partitions
are the frames ("frame 0", "frame 1", ...), each a grid over the whole frame, like the global tile of an
image.
"""

from __future__ import annotations

import torch

from .base import Backend
from .geometry import Geometry, Prepared, Times, check_clip, clip_metadata, clip_prepared
from .random_models import build_tokenizer, text_config, token_ids, vision_config

DEFAULT = "HuggingFaceTB/SmolVLM-256M-Instruct"  # the smallest, an Idefics3 checkpoint; the default without a GPU
DEFAULT_2 = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"  # the smallest SmolVLM2


class SmolVLM(Backend):
    """Idefics3 checkpoints: SmolVLM-256M, SmolVLM-500M, SmolVLM-Instruct, Idefics3-8B-Llama3."""

    model_type = "idefics3"
    family = "SmolVLM"
    model_class = "Idefics3ForConditionalGeneration"
    default = DEFAULT  # the real checkpoint
    thumbnail = True
    cls_token = False

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        cfg = model.config
        self.patches = cfg.vision_config.image_size // cfg.vision_config.patch_size  # per tile side (256M: 32)
        self.scale = cfg.scale_factor  # patches folded per token side (256M: 4)
        self.side = self.patches // self.scale  # tokens per tile side (256M: 8)
        self.encoder = model.model.vision_model.encoder.layers
        self.feature_layer = len(self.encoder) - 1  # its output, through the final norm, is projected

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
        i, j = self.cells()  # (T,) each
        n, f64 = self.side, torch.float64
        boxes = []
        ys, xs = torch.linspace(0, height, rows * n + 1, dtype=f64), torch.linspace(0, width, cols * n + 1, dtype=f64)
        for r in range(rows):
            for c in range(cols):  # tile (r, c) shows 1/rows x 1/cols of the (stretched) image
                y, x = r * n + i, c * n + j
                boxes.append(torch.stack([xs[x], ys[y], xs[x + 1], ys[y + 1]], 1))
        boxes.append(self.whole(height, width))  # the global tile, last
        names = (*(f"tile {r},{c}" for r in range(rows) for c in range(cols)), "global")
        partition = torch.arange(len(names)).repeat_interleave(n * n)
        cells = torch.stack([i, j], 1).repeat(len(names), 1)
        geometry = Geometry(names, partition, cells, torch.cat(boxes).float(), (width, height))
        return geometry, torch.full((len(partition),), -1)

    def cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) row and (T,) column of each token of a tile in its side x side grid, in LLM order: read off
        the model's own pixel shuffle, run on patch indices."""
        index = torch.arange(self.patches**2, dtype=torch.float64).view(1, -1, 1)
        folded = self.folded(index)[:, :, 0].long()  # (T, s * s) the patches each token of a tile folds
        i, j = folded // self.patches // self.scale, folded % self.patches // self.scale  # (T, s * s) token cells
        assert (i == i[:, :1]).all() and (j == j[:, :1]).all(), "a token folds a square block of patches"
        return i[:, 0], j[:, 0]

    def whole(self, height: int, width: int) -> torch.Tensor:
        """(T, 4) float64 pixel boxes of a tile's tokens when the tile shows the whole image (the global tile; a
        clip's frame), in LLM order."""
        i, j = self.cells()  # (T,) each
        n, f64 = self.side, torch.float64
        ys, xs = torch.linspace(0, height, n + 1, dtype=f64), torch.linspace(0, width, n + 1, dtype=f64)
        return torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]], 1)

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        inputs = prepared.inputs
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            return_dict=True,
        )
        return out.pooler_output[0]  # (N, D)

    def encoder_sequences(self, prepared: Prepared) -> list[int]:
        """Every tile and the global one, each patches x patches, attended over alone."""
        return [self.patches**2] * len(prepared.geometry.names)

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        tiles, patches, *rest = values.shape
        folded = self.folded(values.reshape(tiles, patches, -1))  # (N, s * s, C)
        return folded.mean(1).view(-1, *rest) if fold == "mean" else folded.flatten(1)

    @property
    def language_model(self):
        return self.model.model.text_model

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, s * s * C) folded encoder outputs -> the final norm on each patch, then the projection."""
        normed = self.model.model.vision_model.post_layernorm(hidden.view(len(hidden), self.scale**2, -1))
        return self.model.model.connector.modality_projection(normed.flatten(1))


class SmolVLM2(SmolVLM):
    """SmolVLM2 checkpoints (model type `smolvlm`): the same model, with a processor that also takes video."""

    model_type = "smolvlm"
    family = "SmolVLM2"
    model_class = "SmolVLMForConditionalGeneration"
    default = DEFAULT_2  # the real checkpoint

    def visual_token_id(self, prepared: Prepared) -> int:
        """The image token: a clip's frames are images to SmolVLM."""
        return self.image_token_id

    def prepare_video(self, frames: list, prompt: str, times_s: Times = None, duration_s: float = 0.0) -> Prepared:
        """Chat template with one video part + the checkpoint's video processor on exactly these PIL frames
        (`do_sample_frames=False`), told when they were taken in a video of `duration_s` seconds
        (`geometry.clip_metadata`: the prompt says the frames' times and the video's length, as stock on the
        video); without `times_s` it assumes 24 fps, as stock does on bare frames. And the clip's geometry."""
        check_clip(frames, times_s)
        text = self.chat(prompt, part="video")
        metadata = clip_metadata(frames, times_s, duration_s)
        options = {"video_metadata": [metadata]} if metadata is not None else {}
        inputs = self.processor(videos=[frames], text=text, return_tensors="pt", do_sample_frames=False, **options)
        layout = self.video_layout(len(frames), frames[0].size)
        return clip_prepared(inputs.to(self.device), layout, self.image_token_id)

    def video_layout(self, frames: int, size: tuple[int, int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of a clip of `frames` frames of `size` (width, height) pixels: each frame squashed to one
        tile, its tokens a side x side grid over the whole frame, row by row as the pixel shuffle reads them;
        no token is a single patch, so no source row."""
        width, height = size
        i, j = self.cells()  # (T,) each
        boxes = self.whole(height, width).float()  # (T, 4)
        names = tuple(f"frame {f}" for f in range(frames))
        partition = torch.arange(frames).repeat_interleave(len(i))
        cells = torch.stack([i, j], 1).repeat(frames, 1)
        geometry = Geometry(names, partition, cells, boxes.repeat(frames, 1), (width, height))
        return geometry, torch.full((len(partition),), -1)


RANDOM = {  # name -> (vision, text): hidden, layers, heads, mlp; LLM positions: tiny widths, and the LLM depth
    # and positions of the checkpoint each follows (backends/configs/, tests/mirrors/): 30 layers, 8192 positions
    "tiny-idefics3": ((32, 3, 4, 64), (32, 30, 4, 64), 8192),  # SmolVLM-256M-Instruct (model type idefics3)
    "tiny-smolvlm": ((32, 3, 4, 64), (32, 30, 4, 64), 8192),  # SmolVLM2-256M-Video-Instruct (model type smolvlm)
}
TILE, PATCH, SCALE = 512, 16, 4  # SmolVLM-256M-Instruct's tiles, patches and pixel shuffle
# SmolVLM2-256M-Video-Instruct's video processor as transformers 5.23 builds it from the checkpoint's
# preprocessor_config.json (tests/mirrors/, its SOURCES.md): the file's `video_sampling` (1 fps, at most 64
# frames) with its `size` (longest edge 2048, which replaces video_sampling's 512), frames then squashed to
# one 512-px tile; SigLIP's mean and std, Lanczos resampling
VIDEO = {
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
    "size": {"longest_edge": 4 * TILE},
    "max_image_size": {"longest_edge": TILE},
    "image_mean": [0.5] * 3,
    "image_std": [0.5] * 3,
    "resample": 1,
}
CHAT_TEMPLATE = (  # SmolVLM-256M-Instruct's
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with SmolVLM-256M-Instruct's processor
    geometry: longer side 2048 px, 512-px tiles and a global one, patch 16, 4x4 pixel shuffle; built with
    the SmolVLM2 classes (tiny-smolvlm, with SmolVLM2-256M-Video-Instruct's video processor, VIDEO) or the
    Idefics3 ones (tiny-idefics3)."""
    import transformers

    vision, text, positions = RANDOM[name]
    kind = "SmolVLM" if name == "tiny-smolvlm" else "Idefics3"
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
    image_processor = getattr(transformers, f"{kind}ImageProcessorPil")(
        size={"longest_edge": 4 * TILE},
        max_image_size={"longest_edge": TILE},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    parts = {"image_processor": image_processor, "tokenizer": tokenizer}
    if kind == "SmolVLM":
        video = {**VIDEO, "video_sampling": dict(VIDEO["video_sampling"])}  # a copy: the processor writes into it
        parts["video_processor"] = transformers.SmolVLMVideoProcessor(**video)
    processor = getattr(transformers, f"{kind}Processor")(
        **parts, image_seq_len=(TILE // PATCH) ** 2 // SCALE**2, chat_template=CHAT_TEMPLATE
    )
    config = getattr(transformers, f"{kind}Config")(
        text_config=text_config(tokenizer, text, positions, model_type="llama"),
        vision_config=vision_config(f"{kind.lower()}_vision", vision, image_size=TILE, patch_size=PATCH),
        scale_factor=SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **token_ids(tokenizer),
    )
    return config, processor
