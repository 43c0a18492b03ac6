"""Qwen3.5 (Qwen checkpoints, model type qwen3_5: Qwen3.5-0.8B to 27B; the MoE checkpoints, qwen3_5_moe, on the
same code): natively multimodal, with Qwen3-VL's vision side and processor (`qwen3_vl.py`, whose backend this one
extends: 16-px patches, one LLM token per 32x32 pixels, interleaved M-RoPE, the same clips), without DeepStack
(the checkpoints' `deepstack_visual_indexes` is empty), and a hybrid LLM: in every four layers, three Gated
DeltaNet (linear-attention) layers, then one gated full-attention layer (`layer_types`).

Geometry, signals, positions and clips are Qwen3-VL's; a visual token's features are its LLM input alone, as on
Qwen2-VL. The prompt is the checkpoint's chat template with its thinking turned off (`enable_thinking=False`:
the prompt ends with an empty <think></think> block), so that the answer comes at once, as the explorer's
short answers need; by default the template opens a thinking block the answer would spend its tokens on.

Inside the LLM (`llm_prune`). A linear-attention layer keeps a recurrent state and a convolution state, not a
KV cache: it reads the sequence token by token and sums up what it has seen. A cut before layer K means what it
means on every family: in the prefill, layers K and later, linear or full, see only the text and the kept
visual tokens; each linear layer's states then sum up that short sequence, and the decode goes on from them;
each full-attention layer's KV cache holds the short sequence. The full-attention layers gate each head's
output (q_proj gives each head's query, then its gate: `Decoder.gated_query`), normalise queries and keys per
head and rotate a quarter of each head (partial M-RoPE); the hooks that score tokens do as well. What cannot
run is refused with the reason (`refusal`; by name in `explorer.methods.unavailable`):
- a cut scored at a linear-attention layer: it has no attention, queries or keys to read. FastV and DART
  score at the layer before their cut, so they run with K = 4, 8, 12, ... (a full-attention layer at K - 1;
  their default K = 2 is refused); SparseVLM, AIM and GemFilter run with layers that fall on full-attention
  ones; PyramidDrop scores at its cuts' own layers, depth x s / (S + 1), which at 24 (or 32, 64) layers
  always include a linear one, so it never runs here;
- a cut before the first full-attention layer (layer 3) or at it: the model sizes its attention masks from
  that layer's cache (read as the sequence's length), which must count every token, as layer 0's on the
  other families (with eager attention, whose masks are materialised, such a cut breaks the decode);
- decode-time cache cuts (MustDrop's decode stage, DyCoke's): a linear layer's state sums up every token it
  has seen and cannot forget one, so only a quarter of the layers would attend to fewer;
- TransPrune-LLM's token transition, which it measures at every layer's attention;
- GemFilter's first pass stopped at a linear-attention layer (it reads the attention logits there).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
import transformers

from .base import Backend
from .errors import ExplorerError
from .geometry import Prepared
from .llm_prune import Decoder
from .qwen2_vl import Qwen2VL
from .qwen3_vl import Qwen3VL, qwen3_processor
from .random_models import build_tokenizer, text_config, token_ids
from .signals import LLM_TRANSITION

DEFAULT = "Qwen/Qwen3.5-0.8B"
FULL, LINEAR = "full_attention", "linear_attention"  # the kinds of layer in `layer_types`


class Qwen35(Qwen3VL):
    model_type = "qwen3_5"
    family = "Qwen3.5"
    model_class = "Qwen3_5ForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    default = DEFAULT  # the real checkpoint

    # No DeepStack: a visual token is its LLM input alone, handed to the model as on Qwen2-VL
    image_features = Qwen2VL.image_features
    encoder_outputs = Qwen2VL.encoder_outputs
    batch_inputs = Qwen2VL.batch_inputs
    encode = Backend.encode
    merge = Backend.merge
    stacked = 0

    def chat(self, prompt: str, part: str = "image") -> str:
        """The prompt in the checkpoint's chat template, one user turn (the image or video, then the text), with
        its thinking turned off: the prompt ends with an empty <think></think> block."""
        messages = [{"role": "user", "content": [{"type": part}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)

    @property
    def layer_types(self) -> list[str]:
        """Each LLM layer's kind: "linear_attention" (Gated DeltaNet) or "full_attention"."""
        return list(self.language_model.config.layer_types)

    def decoder(self, positions=None) -> Decoder:
        """As Qwen3-VL's (queries and keys normalised per head), with each head's query the first half of its
        q_proj output (the second its output gate), and the linear-attention layers marked recurrent."""
        linear = tuple(layer for layer, kind in enumerate(self.layer_types) if kind == LINEAR)
        return dataclasses.replace(super().decoder(positions), gated_query=True, recurrent=linear)

    def refusal(self, cuts, needs, compact_from=None, attend=None, **options) -> str | None:
        """Why these cuts (layer, score_layer) cannot run on this hybrid LLM, in one line; None when they can."""
        kinds = self.layer_types
        full = [layer for layer, kind in enumerate(kinds) if kind == FULL]
        if compact_from is not None or attend is not None:
            return (
                f"{self.family} cannot cut or narrow the KV caches while decoding: three in four of its LLM layers "
                "are linear-attention (Gated DeltaNet) layers, whose recurrent state sums up every token they "
                "have seen and cannot forget one"
            )
        if LLM_TRANSITION in needs:
            return (
                f"{self.family} cannot give the token transition of every layer's attention: three in four of its "
                "LLM layers are linear-attention (Gated DeltaNet) layers, without attention"
            )
        for layer, score_layer in cuts:
            if layer <= full[0]:
                return (
                    f"{self.family} cannot cut before LLM layer {layer}: the model sizes its attention masks from "
                    f"the cache of its first full-attention layer, {full[0]}, which must hold every token; cut "
                    f"before layer {full[0] + 1} or later"
                )
            if kinds[score_layer] != FULL:
                return (
                    f"{self.family} cannot score a cut at LLM layer {score_layer}: it is a linear-attention (Gated "
                    f"DeltaNet) layer, with no attention, queries or keys to read; its full-attention layers are "
                    f"{', '.join(map(str, full))} (a method that scores at the layer before its cut runs with the "
                    f"cut before {', '.join(str(layer + 1) for layer in full[:3])}, ...)"
                )
        return None

    @contextmanager
    def pruning(self, prepared: Prepared, cuts, needs, choose, keep_positions: bool, **options):
        """As Qwen2-VL's, for the cuts this LLM can make (else refused with the reason, `refusal`). The hooks
        hand the layers after a cut the full-attention layers' mask, narrowed; a linear-attention layer takes
        only a padding mask, which the model gives as None for one unpadded prompt (the only kind cut), so its
        own hook sets it back to None."""
        reason = self.refusal(cuts, needs, **options)
        if reason:
            raise ExplorerError(reason)

        def unpadded(module, args, kwargs):
            return args, {**kwargs, "attention_mask": None}

        with Qwen2VL.pruning(self, prepared, cuts, needs, choose, keep_positions, **options) as record:
            layers = self.language_model.layers
            linear = [layers[i] for i, kind in enumerate(self.layer_types) if kind == LINEAR]
            handles = [layer.register_forward_pre_hook(unpadded, with_kwargs=True) for layer in linear]
            try:
                yield record
            finally:
                for handle in handles:
                    handle.remove()

    def early_pass(self, prepared: Prepared, features: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
        """As every family's, stopped before a full-attention layer; refused before a linear-attention one."""
        if self.layer_types[layer] != FULL:
            full = [i for i, kind in enumerate(self.layer_types) if kind == FULL]
            raise ExplorerError(
                f"{self.family} cannot read attention logits at LLM layer {layer}: it is a linear-attention (Gated "
                f"DeltaNet) layer; its full-attention layers are {', '.join(map(str, full))}"
            )
        return super().early_pass(prepared, features, layer)


class Qwen35Moe(Qwen35):
    model_type = "qwen3_5_moe"
    family = "Qwen3.5-MoE"
    model_class = "Qwen3_5MoeForConditionalGeneration"


# name -> (vision, text) sizes as (hidden, layers, heads, mlp), LLM positions: tiny widths, and the LLM depth
# (with its layer kinds) and positions of Qwen3.5-0.8B (tests/mirrors/Qwen--Qwen3.5-0.8B)
RANDOM = {"tiny-qwen3.5": ((32, 2, 4, 64), (32, 24, 4, 64), 262144)}
# Qwen3.5's chat template reduced to what the explorer renders (one user turn, the image or video first, then the
# text; the generation prompt opens a thinking block, or an empty one with enable_thinking=False); it renders
# these prompts as the published one (tests/mirrors/Qwen--Qwen3.5-0.8B) does
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)


def random_parts(name: str):
    """The config and processor of the random-weight model `name`: Qwen3.5-0.8B's processor geometry (Qwen3-VL's:
    patch 16, 2x2 merge, 65536 to 16777216 pixels, mean and std 0.5; the video processor's 4096 to 25165824
    pixels), its LLM's 24 layers (three linear-attention ones, then a full-attention one, six times), partial
    interleaved M-RoPE (a quarter of each head) and 262144 positions, at tiny widths."""
    (v_hidden, v_layers, v_heads, v_mlp), (hidden, layers, heads, mlp), positions = RANDOM[name]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer = build_tokenizer(
        [*specials, "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"],
        "system user assistant What is shown in this image? Describe the photo.",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    processor = qwen3_processor(tokenizer, CHAT_TEMPLATE)
    vision = dict(depth=v_layers, hidden_size=v_hidden, intermediate_size=v_mlp, num_heads=v_heads)
    vision |= dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden)
    vision |= dict(num_position_embeddings=2304)
    # a head of 32 rotates a quarter, 8 dims: 4 frequencies in M-RoPE sections of 2, 1, 1 (the checkpoints' 11, 11, 10)
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 10000000.0}
    kinds = [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers)]
    linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8)
    linear |= dict(linear_num_key_heads=2, linear_num_value_heads=4)
    text = text_config(
        tokenizer,
        (hidden, layers, heads, mlp),
        model_type="qwen3_5_text",
        max_position_embeddings=positions,
        num_key_value_heads=2,
        head_dim=32,
        rope_parameters=rope | {"partial_rotary_factor": 0.25},
        layer_types=kinds,
        **linear,
    )
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(f"<|{k}|>") for k in ("vision_start", "vision_end")}
    config = transformers.Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        **ids,
        **token_ids(tokenizer),
    )
    return config, processor
