"""Qwen3-VL (Qwen checkpoints, model type qwen3_vl; the MoE checkpoints, qwen3_vl_moe, on the same code):
Qwen2-VL's layout (`qwen2_vl.py`, whose backend this one extends) with 16-px patches, so one LLM token per
32x32 pixels, interleaved M-RoPE, and DeepStack.

Geometry, signals and positions are Qwen2-VL's: one partition, "image", its grid of 32-px cells row by row;
the ViT has no [CLS] token; the M-RoPE positions (time, row, column; interleaved over the rotary frequencies
by the model's own rotary embedding) are computed on the full prompt and the dropped tokens cut out, so kept
tokens keep their places. At most `MAX_PIXELS` pixels an image: 1280 tokens, Qwen2-VL's cap.

DeepStack: the vision encoder also gives, for every visual token, the merged outputs of a few of its middle
layers (`deepstack_visual_indexes`, three in the checkpoints), which the LLM adds to the hidden states of the
visual tokens after its first decoder layers (the first after layer 0, the second after layer 1, ...). So
that a method dropping tokens drops their DeepStack features with them, the features this backend gives
are (N, (1 + S) * D): each token's LLM input, then its S DeepStack features, side by side; keeping rows
keeps all of them, and `encoder_outputs` hands them to generate() as the model's own
`get_image_features` would, so the LLM adds them at the kept tokens of the short prompt. The "features"
signal methods read is the LLM input alone. A merged token's DeepStack features are the same mix of the
merged tokens' DeepStack features (after their mergers, as methods that mix projected features mix them).

A method that cuts inside the LLM (`llm_prune`) shortens the sequence at a layer; the model's own code
would then add DeepStack features at the positions of the full prompt. `pruning` takes them out of the
LLM's call and adds them itself after each of the first decoder layers, to the visual tokens the cuts so
far have left, at their places in the shortened sequence. The LLM's attention normalises each head's
queries and keys (`q_norm`, `k_norm`) before RoPE; the hooks that score tokens do as well.

A clip goes through the checkpoint's own video processor as on Qwen2-VL (`prepare_video`: exactly the frames
given, their times told to it), which folds 2 frames into a temporal group and sizes the frames so that all of
them together stay within its pixel limits (capped at `CLIP_PIXELS`). Qwen3-VL's prompt writes each group's
time as text before it ("<0.5 seconds>", the mean time of its two frames) and wraps every group in its own
vision start and end tokens; the M-RoPE time axis does not count time (each group's tokens start at the
position after the text before it). The geometry is Qwen2-VL's: a partition per temporal group.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
import transformers

from .errors import ExplorerError
from .geometry import Prepared
from .llm_prune import Decoder
from .qwen2_vl import CHAT_TEMPLATE, Qwen2VL, qwen_tokenizer
from .random_models import text_config, token_ids
from .signals import FEATURES

DEFAULT = "Qwen/Qwen3-VL-2B-Instruct"
MAX_PIXELS = 1280 * 32 * 32  # 1280 tokens an image, as Qwen2-VL's cap; the checkpoints allow 16384
# At most 8 images' worth of pixels a clip, all its frames together (5120 tokens, 2 frames a token): the
# checkpoints' video processor allows 25165824 (12288 tokens)
CLIP_PIXELS = 8 * MAX_PIXELS


class Qwen3VL(Qwen2VL):
    model_type = "qwen3_vl"
    family = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    default = DEFAULT  # the real checkpoint

    @property
    def width(self) -> int:
        """D, the LLM's hidden size: the width of a visual token's input and of each DeepStack feature."""
        return self.model.config.text_config.hidden_size

    def image_options(self) -> dict:
        size = self.processor.image_processor.size
        return {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": min(size["longest_edge"], MAX_PIXELS)}}

    def video_options(self) -> dict:
        """The video processor's arguments: its own pixel limits, the upper one (all the frames of a clip together,
        as Qwen3-VL's video processor counts them) capped at `CLIP_PIXELS`, and no per-frame cap (its default)."""
        size = self.processor.video_processor.size
        longest = min(size["longest_edge"], CLIP_PIXELS)
        return {
            "size": {"shortest_edge": size["shortest_edge"], "longest_edge": longest},
            "cap_pixels_per_frame": False,
        }

    def grid(self, image_size: list[int], frames: int | None = None) -> torch.Tensor:
        """As Qwen2-VL's for an image; a clip's frames are resized by Qwen3-VL's video rule, which sizes the
        frames so that all of them together stay within the pixel limits."""
        if frames is None:
            return super().grid(image_size)
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        vp, size = self.processor.video_processor, self.video_options()["size"]
        try:
            h, w = smart_resize(
                frames,
                *image_size,
                vp.temporal_patch_size,
                vp.patch_size * vp.merge_size,
                size["shortest_edge"],
                size["longest_edge"],
            )
        except ValueError as error:  # fewer frames than a temporal patch, or an aspect ratio over 200
            raise ExplorerError(f"{self.family} cannot take this clip: {error}") from None
        return torch.tensor([[-(-frames // vp.temporal_patch_size), h // vp.patch_size, w // vp.patch_size]])

    def prepare_video(self, frames: list, prompt: str, *when) -> Prepared:
        """As Qwen2-VL's (`when`: the frames' times and the video's duration); a clip the video processor cannot
        take (a single frame, for one) is refused first, with the reason."""
        if frames:
            self.grid([frames[0].height, frames[0].width], len(frames))
        return super().prepare_video(frames, prompt, *when)

    def image_features(self, prepared: Prepared) -> torch.Tensor:
        """(N, (1 + S) * D) each visual token's LLM input and its S DeepStack features, of the image or the
        clip, by the model's own code."""
        model, inputs = self.model.model, prepared.inputs
        pixels = inputs["pixel_values_videos" if prepared.video else "pixel_values"]
        out = (model.get_video_features if prepared.video else model.get_image_features)(
            pixels, self.thw(prepared), return_dict=True
        )
        return torch.cat([out.pooler_output[0], *(stack[0] for stack in out.deepstack_features)], 1)

    def encode(self, prepared: Prepared, needs: tuple[str, ...], project: bool = True, merging=None):
        """As every family's; the "features" signal is the LLM input alone, without the DeepStack features."""
        features, signals = super().encode(prepared, needs, project, merging)
        if FEATURES in signals:
            signals[FEATURES] = signals[FEATURES][:, : self.width]  # (N, D)
        return features, signals

    def merge(self, features: torch.Tensor, signals: dict[str, torch.Tensor], selection) -> torch.Tensor:
        """As every family's for the LLM inputs (the merger on the mixed encoder outputs); a kept token's
        DeepStack features become the same mix of the DeepStack features, sum_j weights[k, j] * stack_j."""
        main, stacks = features[:, : self.width], features[:, self.width :]  # (N, D), (N, S * D)
        merged = stacks.clone()
        weights = selection.weights.to(device=features.device, dtype=torch.float32)  # sparse (K, N)
        merged[selection.keep.to(features.device)] = (weights @ stacks.float()).to(stacks.dtype)  # (K, S * D)
        return torch.cat([super().merge(main, signals, selection), merged], 1)

    def encoder_outputs(self, prepared: Prepared, kept: torch.Tensor) -> dict:
        """generate()'s `mm_encoder_outputs` for (K, (1 + S) * D) kept tokens: their LLM inputs and each
        DeepStack layer's features, as lists of one (K, D), as get_image_features gives them."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        main, *stacks = kept.split(self.width, 1)  # (K, D) each
        output = BaseModelOutputWithDeepstackFeatures(pooler_output=[main], deepstack_features=[[s] for s in stacks])
        return {"video" if prepared.video else "image": output}

    def batch_inputs(self, each: list[dict]) -> dict:
        """As Qwen2-VL's, with each image's or clip's DeepStack features joined in the batch's order as well."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        batch = super().batch_inputs(each)
        for key, joined in batch["mm_encoder_outputs"].items():  # images, clips
            parts = [inputs["mm_encoder_outputs"][key] for inputs in each if key in inputs["mm_encoder_outputs"]]
            stacks = [[f for part in parts for f in part.deepstack_features[s]] for s in range(self.stacked)]
            batch["mm_encoder_outputs"][key] = BaseModelOutputWithDeepstackFeatures(
                pooler_output=joined.pooler_output, deepstack_features=stacks
            )
        return batch

    @property
    def stacked(self) -> int:
        """S, the number of DeepStack layers: the first S decoder layers each add one."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def decoder(self, positions=None) -> Decoder:
        """As every family's, with the queries and keys normalised per head before RoPE, as Qwen3's attention does."""
        return dataclasses.replace(super().decoder(positions), qk_norm=True)

    @contextmanager
    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool, **options):
        """As Qwen2-VL's, with the DeepStack features added by hooks to the visual tokens left by the cuts."""
        with super().pruning(prepared, cuts, needs, choose, keep_positions, **options) as record:
            with self.deepstack_after_cuts(record):
                yield record

    @contextmanager
    def deepstack_after_cuts(self, record):
        """While the block runs, the LLM's DeepStack arguments (`visual_pos_masks`, (1, L) over the full
        sequence; `deepstack_visual_embeds`, S x (N, D)) are taken out of its call, and the output of each of
        its first S decoder layers gets layer s's features added at the visual tokens still in the sequence:
        those kept by the last cut made so far in this pass (`record.keeps`), each moved back by the visual
        tokens cut before it (a cut removes visual tokens only)."""
        passed: dict = {}

        def take(module, args, kwargs):
            passed["places"] = kwargs.pop("visual_pos_masks", None)
            passed["stacks"] = kwargs.pop("deepstack_visual_embeds", None)
            return args, kwargs

        def add(layer: int):
            def hook(module, args, hidden):  # hidden: (1, L', D)
                stacks = passed["stacks"]
                if stacks is None or layer >= len(stacks):
                    return None
                places = passed["places"][0].nonzero()[:, 0].to(hidden.device)  # (N,) in the full sequence
                features = stacks[layer].to(hidden.device, hidden.dtype)  # (N, D)
                if record.keeps:
                    keep = record.keeps[-1].to(hidden.device)  # (K,) indices into N
                    places = places[keep] - keep + torch.arange(len(keep), device=hidden.device)  # (K,)
                    features = features[keep]
                out = hidden.clone()
                out[0, places] = out[0, places] + features
                return out

            return hook

        lm = self.language_model
        handles = [lm.register_forward_pre_hook(take, with_kwargs=True)]
        try:
            handles += [lm.layers[s].register_forward_hook(add(s)) for s in range(min(self.stacked, len(lm.layers)))]
            yield
        finally:
            for handle in handles:
                handle.remove()


class Qwen3VLMoe(Qwen3VL):
    model_type = "qwen3_vl_moe"
    family = "Qwen3-VL-MoE"
    model_class = "Qwen3VLMoeForConditionalGeneration"


RANDOM = {  # name -> (vision, text) sizes as (hidden, layers, heads, mlp), LLM positions: tiny widths, and the
    # LLM depth and positions of the checkpoint it follows (backends/configs/, tests/mirrors/)
    "tiny-qwen3-vl": ((32, 4, 4, 64), (32, 28, 4, 64), 262144),  # Qwen3-VL-2B-Instruct: 28 layers, 262144 positions
}
# Qwen3-VL's chat template, reduced to what the explorer renders (one user turn, the image first, the
# text): no default system turn, unlike Qwen2-VL's (tests/mirrors/Qwen--Qwen3-VL-2B-Instruct holds the
# published one, which renders these prompts the same).
CHAT_TEMPLATE_3 = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}",
    "",
)


def random_parts(name: str):
    """The config and processor of the random-weight model `name`, with the Qwen3-VL-2B processor geometry
    (patch 16, 2x2 merge, 65536 to 16777216 pixels, mean and std 0.5; the video processor's 4096 to
    25165824 pixels), interleaved M-RoPE, and DeepStack from the vision layers 0, 1 and 2 into the LLM's
    first three layers (the checkpoint's: 5, 11 and 17 of 24)."""
    (v_hidden, v_layers, v_heads, v_mlp), text, positions = RANDOM[name]
    tokenizer = qwen_tokenizer("system user assistant What is shown in this image? Describe the photo.")
    processor = qwen3_processor(tokenizer, CHAT_TEMPLATE_3)
    vision = dict(depth=v_layers, hidden_size=v_hidden, intermediate_size=v_mlp, num_heads=v_heads)
    vision |= dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text[0])
    vision |= dict(num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2])
    head = text[0] // text[2]
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 5000000.0}
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(f"<|{k}|>") for k in ("vision_start", "vision_end")}
    config = transformers.Qwen3VLConfig(
        text_config=text_config(
            tokenizer,
            text,
            positions,
            model_type="qwen3_vl_text",
            num_key_value_heads=2,
            head_dim=head,
            rope_parameters=rope,
        ),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        **ids,
        **token_ids(tokenizer),
    )
    return config, processor


def qwen3_processor(tokenizer, chat_template: str):
    """A random-weight model's processor with the Qwen3-VL checkpoints' geometry (also Qwen3.5's): patch 16,
    2x2 merge, 65536 to 16777216 pixels an image, 4096 to 25165824 a clip's frames, mean and std 0.5."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 16, "merge_size": 2}
    return transformers.Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, **half),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, **half),
        chat_template=chat_template,
    )
