"""Qwen2-VL and Qwen2.5-VL (Qwen checkpoints): the image at its own resolution, one LLM token per
28x28 pixels.

The processor resizes the image to sides that are multiples of 28 px with at most `MAX_PIXELS`
pixels (`smart_resize`, aspect ratio nearly kept), cuts it into 14-px patches and the vision
transformer folds each 2x2 block of patches into one token (the "merger"). Visual tokens in LLM
order: one partition, "image", its grid of 28-px cells row by row; each token's cell is read off the
model's own vision position ids (the rows and columns its rotary embedding uses), its box is that
cell on the original image.

The LLM places tokens by 3-D M-RoPE positions (time, row, column for visual tokens). Dropping tokens
must not move the others: the positions are computed on the full prompt (`get_rope_index`), the
dropped ones are cut out and the rest are passed as `position_ids`, so kept tokens keep their
places and decoding continues after the full prompt's last position, as it would unreduced. Methods
that cut inside the LLM keep those positions too, or, renumbering, move a kept token back on all three
axes by the number of tokens cut before it.

The Qwen ViT has no [CLS] token: the "cls" signals are the attention each patch receives (see
`signals.attention_maps`) within the patches it attends to (the whole image; in Qwen2.5-VL's windowed
layers, its window), averaged over the 4 patches of a token, as the LightCompress port does; keys
(before the rotary embedding) too are averaged, and "hidden" holds a token's 4 patches side by side,
as the merger takes them. Qwen2.5-VL runs its layers on patches reordered by window; the signals are
put back in image order with the model's own window index.

A clip (`prepare_video`) goes through the checkpoint's own video processor (Qwen2VLVideoProcessor) on
exactly the frames given: every frame resized as an image of its size would be (with the video
processor's own pixel limits, capped as images are), and each temporal patch folds 2 frames into one
tube of 2x14x14 pixels; an odd count of frames is padded by the processor, which repeats the last frame.
The LLM reads the temporal groups one after the other, each its 28-px cells row by row; partitions are
the groups ("frames 0-1", "frames 2-3", ..., "frame 6" for a last frame padded by its own copy). Their
M-RoPE time axis is the group's index (Qwen2-VL) or its absolute time (Qwen2.5-VL: `tokens_per_second`
x `second_per_grid_ts`, the seconds a group spans, from the rate of the frames given: their count over the
video's duration, as stock has it when it samples the frames itself, evenly spaced or not).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch
import transformers

from .base import Backend
from .errors import ExplorerError
from .geometry import Geometry, Prepared, Times, check_clip, clip_metadata, clip_prepared
from .random_models import build_tokenizer, text_config, token_ids
from .signals import ATTENTION, HIDDEN, KEYS, attention_maps

DEFAULT = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_25 = "Qwen/Qwen2.5-VL-3B-Instruct"
# At most 1280 visual tokens per image (the Qwen2-VL image processor's own default): the checkpoints
# allow 16384, with which a 4K photo makes ~12k visual tokens and a vision attention over ~50k
# patches, more than a small GPU (or a CPU) can hold. Applies to every run, app and CLI alike.
MAX_PIXELS = 1280 * 28 * 28


class Qwen2VL(Backend):
    model_type = "qwen2_vl"
    family = "Qwen2-VL"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    default = DEFAULT  # the real checkpoint
    cls_token = False

    def __init__(self, model, processor, name: str, random_weights: bool = False):
        super().__init__(model, processor, name, random_weights)
        vision = model.model.visual
        self.merge_size = vision.spatial_merge_size  # 2
        self.encoder = vision.blocks
        self.feature_layer = len(self.encoder) - 1  # the merger takes the last block's output
        self.rotary = importlib.import_module(type(vision).__module__).apply_rotary_pos_emb_vision

    def image_options(self) -> dict:
        size = self.processor.image_processor.size
        return {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": min(size["longest_edge"], MAX_PIXELS)}}

    def video_options(self) -> dict:
        """The video processor's arguments: its own pixel limits per frame, capped as images are, and its own
        total-pixel cap setting (transformers' default, off, said explicitly)."""
        size = self.processor.video_processor.size
        longest = min(size["longest_edge"], MAX_PIXELS)
        cap = bool(self.processor.video_processor.cap_pixels_per_frame)
        return {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": longest}, "cap_pixels_per_frame": cap}

    def grid(self, image_size: list[int], frames: int | None = None) -> torch.Tensor:
        """(1, 3) the (time, rows, columns) of 14-px patches the processor makes of an image of (height, width),
        or of a clip of `frames` frames of that size (time: its temporal groups, an odd count padded)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        video = frames is not None
        ip = self.processor.video_processor if video else self.processor.image_processor
        options = self.video_options() if video else self.image_options()
        shortest, longest = options["size"]["shortest_edge"], options["size"]["longest_edge"]
        factor = ip.patch_size * ip.merge_size
        if video and options["cap_pixels_per_frame"]:  # the video processor's `resize`: a share of the clip's pixels
            total = int(ip.max_video_tokens * factor * factor * 0.9)
            longest = max(min(longest, total * ip.temporal_patch_size // frames), int(shortest * 1.05))
        height, width = image_size
        try:
            h, w = smart_resize(height, width, factor, shortest, longest)
        except ValueError as error:  # aspect ratio over 200
            kind = "video" if video else "image"
            raise ExplorerError(f"{self.family} cannot take a {width}x{height} {kind}: {error}") from None
        time = -(-frames // ip.temporal_patch_size) if video else 1
        return torch.tensor([[time, h // ip.patch_size, w // ip.patch_size]])

    def layout(self, image_size: list[int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of an image of (height, width) pixels; no token is a single patch, so no source row."""
        height, width = image_size
        cells, boxes = self.cells(self.grid(image_size), height, width)
        n = len(cells)
        geometry = Geometry(("image",), torch.zeros(n, dtype=torch.long), cells, boxes, (width, height))
        return geometry, torch.full((n,), -1)

    def cells(self, grid: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) each token's cell and (N, 4) its box on an image of (height, width), for one temporal slice of
        `grid`, read off the model's own vision position ids (the rows and columns its rotary embedding uses)."""
        from transformers.vision_utils import get_vision_position_ids

        grid = grid.clone()
        grid[:, 0] = 1
        _, rows, cols = grid[0].tolist()  # in patches
        places = get_vision_position_ids(grid, self.merge_size)  # (P, 2) row, col per patch
        cells = places.view(-1, self.merge_size**2, 2) // self.merge_size  # (N, 4, 2) the token of each of its patches
        assert (cells == cells[:, :1]).all(), "a token folds one block of patches"
        i, j = cells[:, 0, 0], cells[:, 0, 1]  # (N,)
        side_y, side_x = height * self.merge_size / rows, width * self.merge_size / cols  # a token's cell on the image
        boxes = torch.stack([j * side_x, i * side_y, (j + 1) * side_x, (i + 1) * side_y], 1)
        return cells[:, 0], torch.minimum(boxes, torch.tensor([width, height, width, height])).float()

    def video_layout(self, frames: int, size: tuple[int, int]) -> tuple[Geometry, torch.Tensor]:
        """Geometry of a clip of `frames` frames of `size` (width, height) pixels, without running the model:
        the temporal groups one after the other, each the layout of one frame; a group is named by the
        frames it holds among those given ("frames 2-3"; "frame 6" when the processor pads it with a copy)."""
        width, height = size
        grid = self.grid([height, width], frames)
        step = self.processor.video_processor.temporal_patch_size
        groups = int(grid[0, 0])
        cells, boxes = self.cells(grid, height, width)
        spans = [(g * step, min(g * step + step, frames) - 1) for g in range(groups)]
        names = tuple(f"frames {a}-{b}" if b > a else f"frame {a}" for a, b in spans)
        partition = torch.arange(groups).repeat_interleave(len(cells))
        n = len(partition)
        geometry = Geometry(names, partition, cells.repeat(groups, 1), boxes.repeat(groups, 1), (width, height))
        return geometry, torch.full((n,), -1)

    def prepare_video(self, frames: list, prompt: str, times_s: Times = None, duration_s: float = 0.0) -> Prepared:
        """Chat template with one video part + the checkpoint's video processor on exactly these PIL frames
        (`do_sample_frames=False`), with the pixel cap of `video_options`, and the clip's geometry. With
        `times_s`, the processor is told when the frames were taken in a video of `duration_s` seconds
        (`geometry.clip_metadata`), as if it had sampled them itself: Qwen2.5-VL's processor makes
        `second_per_grid_ts` of their rate, frames / duration, however unevenly they are spaced; without
        times it assumes its default (24 fps), as stock does on bare frames."""
        check_clip(frames, times_s)
        text, options = self.chat(prompt, part="video"), self.video_options()
        metadata = clip_metadata(frames, times_s, duration_s)
        if metadata is not None:
            options["video_metadata"] = [metadata]
        inputs = self.processor(videos=[frames], text=text, return_tensors="pt", do_sample_frames=False, **options)
        layout = self.video_layout(len(frames), frames[0].size)
        return clip_prepared(inputs.to(self.device), layout, self.model.config.video_token_id)

    def encoder_outputs(self, prepared: Prepared, kept: torch.Tensor) -> dict:
        """generate()'s `mm_encoder_outputs` for (K, D) kept tokens: a clip's as a list of one (K, D), as
        get_video_features gives them."""
        key = "video" if prepared.video else "image"
        return {key: transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=[kept])}

    def batch_inputs(self, each: list[dict]) -> dict:
        """As every family's, with the clips' kept tokens as the model takes them: one list, one (K, D) per
        clip, in the batch's order."""
        clips = [inputs["mm_encoder_outputs"].get("video") for inputs in each]
        images = [{k: v for k, v in i["mm_encoder_outputs"].items() if k != "video"} for i in each]
        rest = [inputs | {"mm_encoder_outputs": kept} for inputs, kept in zip(each, images)]
        batch = super().batch_inputs(rest)
        if any(clips):
            joined = [f for clip in clips if clip is not None for f in clip.pooler_output]
            batch["mm_encoder_outputs"]["video"] = transformers.modeling_outputs.BaseModelOutputWithPooling(
                pooler_output=joined
            )
        return batch

    @staticmethod
    def thw(prepared: Prepared) -> torch.Tensor:
        """(1, 3) the processor's (time, rows, columns) of patches of the image or clip."""
        return prepared.inputs["video_grid_thw" if prepared.video else "image_grid_thw"]

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        """(N, D) the visual tokens of the image or the clip, by the model's own code."""
        inputs, model = prepared.inputs, self.model.model
        if prepared.video:
            out = model.get_video_features(inputs["pixel_values_videos"], self.thw(prepared), return_dict=True)
        else:
            out = model.get_image_features(inputs["pixel_values"], self.thw(prepared), return_dict=True)
        return out.pooler_output[0]  # (N, D)

    def encoder_sequences(self, prepared: Prepared) -> list[int]:
        """The patches of each temporal slice (an image has one), each attended over alone, as the model's
        own attention segments cut them: rows x columns, time times."""
        time, rows, columns = self.thw(prepared)[0].tolist()
        return [rows * columns] * time

    @contextmanager
    def hooks(self, prepared: Prepared, wants: dict[int, set[str]]):
        """Capture the signals of the chosen blocks: (P, ...) per patch, in the order the blocks see them.

        Attention is recomputed from each block's own q/k (a hook on its qkv projection, with the
        rotary embedding and the attention segments its attention gets), segment by segment, so
        the encoder keeps its fast attention kernel."""
        out: dict[tuple[str, int], torch.Tensor] = {}
        segments: dict[int, tuple] = {}

        def before(layer):
            def hook(module, args, kwargs):  # the attention's own arguments
                segments[layer] = kwargs["cu_seqlens"].tolist(), kwargs["position_embeddings"]

            return hook

        def on_qkv(layer, kinds):
            attn = self.encoder[layer].attn

            def hook(module, args, qkv):  # qkv: (P, 3 * D)
                q, k, _ = qkv.unflatten(-1, (3, attn.num_heads, -1)).unbind(1)  # (P, h, d) each
                if KEYS in kinds:
                    out[KEYS, layer] = k.float()
                if not kinds & set(ATTENTION):
                    return
                bounds, (cos, sin) = segments.pop(layer)
                q, k = self.rotary(q, k, cos, sin)
                maps = [
                    attention_maps(q[None, s:e].float(), k[None, s:e].float(), kinds, attn.scaling, cls=False)
                    for s, e in zip(bounds[:-1], bounds[1:])
                ]  # per segment: kind -> (1, e - s)
                out.update({(kind, layer): torch.cat([m[kind][0] for m in maps]) for kind in maps[0]})

            return hook

        def on_output(layer):
            def hook(module, args, hidden):  # hidden: (P, C)
                out[HIDDEN, layer] = hidden.float()

            return hook

        handles = []
        try:
            for layer, kinds in sorted(wants.items()):
                block = self.encoder[layer]
                if kinds & set(ATTENTION):
                    handles.append(block.attn.register_forward_pre_hook(before(layer), with_kwargs=True))
                if kinds & {*ATTENTION, KEYS}:
                    handles.append(block.attn.qkv.register_forward_hook(on_qkv(layer, kinds)))
                if HIDDEN in kinds:
                    handles.append(block.register_forward_hook(on_output(layer)))
            yield out
        finally:
            for handle in handles:
                handle.remove()

    def in_image_order(self, prepared: Prepared, values: torch.Tensor) -> torch.Tensor:
        """(P, C) per-patch values in the order the blocks see them -> (N, 4, C), each token's patches."""
        return values.view(-1, self.merge_size**2, values.shape[-1])

    def tokens_of(self, prepared: Prepared, values: torch.Tensor, fold: str) -> torch.Tensor:
        patches, *rest = values.shape
        folded = self.in_image_order(prepared, values.reshape(patches, -1))  # (N, 4, C)
        return folded.mean(1).view(-1, *rest) if fold == "mean" else folded.flatten(1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(K, 4 * C) a token's 4 patches side by side -> the model's merger (norm on each, then the MLP)."""
        return self.model.model.visual.merger(hidden.view(len(hidden) * self.merge_size**2, -1))

    def positions(self, prepared: Prepared) -> torch.Tensor:
        """(3, 1, L) the M-RoPE positions (time, row, column) of the full prompt, as the model computes them."""
        inputs = prepared.inputs
        grids = {"video_grid_thw": self.thw(prepared)} if prepared.video else {"image_grid_thw": self.thw(prepared)}
        if "second_per_grid_ts" in inputs:  # Qwen2.5-VL's clips: the seconds each temporal group spans
            grids["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], attention_mask=inputs["attention_mask"], **grids
        )
        return positions

    @contextmanager
    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool, **options):
        """As every family's, with the M-RoPE positions the LLM gets in each pass: a renumbered token
        moves back by the tokens cut before it on all three axes, so the image keeps its 2-D layout."""
        passed = {}

        def record(module, args, kwargs):  # position_ids: (4, 1, L), the text order, then time, row, column
            ids = kwargs.get("position_ids")
            passed["positions"] = ids[-3:] if ids is not None and ids.dim() == 3 else None

        handle = self.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with super().pruning(
                prepared, cuts, needs, choose, keep_positions, lambda: passed.get("positions"), **options
            ) as done:
                yield done
        finally:
            handle.remove()

    def generate_inputs(self, prepared: Prepared, features: torch.Tensor, keep: torch.Tensor) -> dict:
        """generate() arguments for the prompt with only the kept visual tokens, each at its place in the
        full prompt: `position_ids` (4, 1, L'), the first row the tokens' index in the short prompt (for
        the attention mask, as generate() builds it), then the full prompt's M-RoPE positions of the
        tokens that stay. generate() continues every row by one per new token, so the first answer
        token sits right after the full prompt's last position, as unreduced."""
        inputs = super().generate_inputs(prepared, features, keep)
        kept = self.positions(prepared)[..., self.staying(prepared, keep)]  # (3, 1, L')
        order = torch.arange(kept.shape[-1], device=kept.device).view(1, 1, -1)
        return inputs | {"position_ids": torch.cat([order, kept])}


class Qwen25VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    family = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    default = DEFAULT_25  # the real checkpoint

    def encoder_windows(self, prepared: Prepared) -> list[int]:
        """The patches of each window of the windowed blocks, as the model's own window index cuts them."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.model.visual
        grid = self.thw(prepared)
        _, bounds = get_vision_window_index(
            grid, vision.spatial_merge_size, vision.window_size, vision.patch_size
        )  # (windows + 1,) cumulative patches
        return bounds.diff().tolist()

    def in_image_order(self, prepared: Prepared, values: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's blocks see the tokens' patches grouped by window: put them back in image order."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.model.visual
        window, _ = get_vision_window_index(
            self.thw(prepared), vision.spatial_merge_size, vision.window_size, vision.patch_size
        )  # (N,) the token at each place of the window order
        return super().in_image_order(prepared, values)[torch.argsort(window).to(values.device)]


RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp), LLM positions: tiny widths, and the
    # LLM depth and positions of the checkpoint each follows (backends/configs/, tests/mirrors/)
    "tiny-qwen2-vl": ((32, 3, 4, 64), (32, 28, 4, 64), 32768),  # Qwen2-VL-2B-Instruct: 28 layers, 32768 positions
    "tiny-qwen2.5-vl": ((32, 4, 4, 64), (32, 36, 4, 64), 128000),  # Qwen2.5-VL-3B-Instruct: 36, 128000
}
CHAT_TEMPLATE = (  # the Qwen2-VL / Qwen2.5-VL chat template, images first, then videos
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_tokenizer(corpus: str):
    """A random-weight model's tokenizer with the Qwen chat and vision special tokens, its words from `corpus`."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    return build_tokenizer(
        [*specials, "<|image_pad|>", "<|video_pad|>"],
        corpus,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with the Qwen2-VL-2B / Qwen2.5-VL-3B
    processor geometry (patch 14, 2x2 merge, 3136 to 12845056 pixels; Qwen2.5-VL: 112-px windows,
    the last block attending to the whole image, 2 tokens a second on the time axis) and video processor:
    the checkpoints publish no video_preprocessor_config.json, so transformers builds their
    Qwen2VLVideoProcessor from preprocessor_config.json (min/max pixels 3136/12845056 as size, temporal
    patch 2, merge 2, CLIP mean and std; the rest the class's defaults: bicubic, no frame sampling, no
    total-pixel cap), checked by loading the mirrors in tests/mirrors/."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    qwen25 = name == "tiny-qwen2.5-vl"
    backend = Qwen25VL if qwen25 else Qwen2VL
    (v_hidden, v_layers, v_heads, v_mlp), text, positions = RANDOM[name]
    tokenizer = qwen_tokenizer(
        "system user assistant You are a helpful assistant. What is shown in this image? Describe the photo."
    )
    processor = getattr(transformers, backend.processor_class)(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056, temporal_patch_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    vision = dict(depth=v_layers, num_heads=v_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if qwen25:
        vision |= dict(hidden_size=v_hidden, intermediate_size=v_mlp, out_hidden_size=text[0], window_size=112)
        vision |= dict(fullatt_block_indexes=[v_layers - 1])  # as the checkpoints' last block: the whole image
        vision |= dict(tokens_per_second=2)  # Qwen2.5-VL-3B's
    else:
        vision |= dict(embed_dim=v_hidden, mlp_ratio=v_mlp // v_hidden, hidden_size=text[0])
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(f"<|{k}|>") for k in ("vision_start", "vision_end")}
    config_class = transformers.Qwen2_5_VLConfig if qwen25 else transformers.Qwen2VLConfig
    config = config_class(
        text_config=text_config(
            tokenizer,
            text,
            positions,
            model_type=f"{backend.model_type}_text",
            num_key_value_heads=2,  # grouped-query attention, as the checkpoints
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1000000.0},
        ),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        **ids,
        **token_ids(tokenizer),
    )
    return config, processor
