"""What a run costs on paper, from the config and the real token counts: the FLOPs of the vision stage
(the encoder per crop, tile or frame, block by block on fewer tokens where a method merges inside it, the
attention maps the hooks recompute, the projector) and of the LLM's prefill (with a first pass over the
whole prompt before it where a method runs one, GemFilter), the bytes of the KV cache the decode works
on (the one the prefill fills, or less where a method cuts it after the prefill) and of the weights. The
bench and the app report them beside the measured times, labelled computed, so a saving can be checked
against what the token counts promise; `footprint` gives the same for a real checkpoint's architecture at
a small model's token counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only LLM that its cost depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int  # the gated MLP's inner size
    vocab: int
    # Qwen3.5's hybrid LLM: its linear-attention (Gated DeltaNet) layers, which hold no KV cache and pair no
    # tokens, and per token the widths their input projections make (q, k, v, the output gate, the two rates),
    # the width their output projection takes and the multiply-adds of their causal convolution and recurrence
    # (3 per key x value dim of every value head: the state's decay and update, and its read-out); and the
    # full-attention layers' q_proj making each head's output gate beside its query (`gated_query`)
    linear: tuple[int, ...] = ()
    linear_in: int = 0
    linear_out: int = 0
    linear_token: int = 0
    gated_query: bool = False

    @classmethod
    def of(cls, config) -> Shape:
        """The shape of a model's LLM, from its (composite) transformers config."""
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        sizes = (text.num_attention_heads, kv_heads, head_dim, text.intermediate_size, text.vocab_size)
        shape = cls(text.hidden_size, text.num_hidden_layers, *sizes)
        if text.model_type not in ("qwen3_5_text", "qwen3_5_moe_text"):
            return shape
        keys, values = (
            text.linear_num_key_heads * text.linear_key_head_dim,
            text.linear_num_value_heads * text.linear_value_head_dim,
        )
        state = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim
        return dataclasses.replace(
            shape,
            linear=tuple(i for i, kind in enumerate(text.layer_types) if kind == "linear_attention"),
            linear_in=2 * keys + 2 * values + 2 * text.linear_num_value_heads,
            linear_out=values,
            linear_token=(2 * keys + values) * text.linear_conv_kernel_dim + 3 * state,
            gated_query=True,
        )


def prefill_flops(shape: Shape, tokens: list[int]) -> int:
    """FLOPs of the prefill when LLM layer l holds tokens[l] tokens (text and visual), counting 2 per
    multiply-add of every matrix product: the q, k, v and o projections, the gated MLP, q.k and the
    weighted sum of v over all tokens[l]^2 pairs, and the LM head on the last token only, as
    generate() computes it. This is what torch.utils.flop_counter counts; causal attention kernels
    skip about half of the pairs, and norms, RoPE and softmax are left out."""
    assert len(tokens) == shape.layers, "one token count per LLM layer"
    return 2 * (sum(_layer_macs(shape, t, layer) for layer, t in enumerate(tokens)) + shape.hidden * shape.vocab)


def _layer_macs(shape: Shape, t: int, layer: int) -> int:
    """Multiply-adds of LLM layer `layer` on t tokens: its matrices on every token, then q.k and the weighted sum
    of v; a linear-attention layer's convolution and recurrence instead of those."""
    if layer in shape.linear:
        return t * (_layer_weights(shape, layer) + shape.linear_token)
    return t * _layer_weights(shape, layer) + 2 * t * t * shape.heads * shape.head_dim


def _layer_weights(shape: Shape, layer: int) -> int:
    """The weights of LLM layer `layer`'s matrices: q (with its gate), k, v, o, or a linear-attention layer's
    projections, and the gated MLP."""
    h = shape.hidden
    if layer in shape.linear:
        return h * (shape.linear_in + shape.linear_out) + 3 * h * shape.mlp
    queries = shape.heads * (2 if shape.gated_query else 1)
    return h * shape.head_dim * (queries + 2 * shape.kv_heads + shape.heads) + 3 * h * shape.mlp


@dataclass(frozen=True)
class FirstPass:
    """A first pass of the LLM over the whole prompt before the prefill the answer is decoded from
    (GemFilter's, `Backend.early_pass`): `tokens` tokens, every visual one in, stopped at decoder layer `layer`."""

    tokens: int
    layer: int


def first_pass_flops(shape: Shape, first: FirstPass) -> int:
    """FLOPs of a `FirstPass`, counted as `prefill_flops` counts: layers 0 .. layer - 1 whole on every token
    (no cache, no LM head), then at the filter layer the keys of every token, the last token's query and its
    q.k with every key, per head; nothing after it runs."""
    t, h, d = first.tokens, shape.hidden, shape.head_dim
    queries = shape.heads * (2 if shape.gated_query else 1)  # a gated q_proj makes each head's gate too
    filter_layer = t * h * shape.kv_heads * d + h * queries * d + shape.heads * t * d
    return 2 * (sum(_layer_macs(shape, t, layer) for layer in range(first.layer)) + filter_layer)


def kv_bytes(shape: Shape, tokens: list[int], itemsize: int) -> int:
    """Bytes of the prompt's KV cache when layer l's cache holds tokens[l] tokens (after the prefill, or
    once a method has cut the caches for decoding): a key and a value of kv_heads x head_dim numbers of
    `itemsize` bytes per token of each layer. Every generated token adds the same to every run. A
    linear-attention layer holds no KV cache (its state's size does not depend on the tokens)."""
    assert len(tokens) == shape.layers, "one token count per LLM layer"
    cached = sum(t for layer, t in enumerate(tokens) if layer not in shape.linear)
    return cached * 2 * shape.kv_heads * shape.head_dim * itemsize


@dataclass(frozen=True)
class Encoder:
    """The sizes of a vision encoder and of its projector that their cost depends on (`Encoder.of`)."""

    hidden: int  # C
    layers: int  # layers run (all of them, also those above the feature layer)
    mlp: int  # the MLP's inner size
    mlp_matrices: int  # 2 (fc1, fc2), or 3 for a gated MLP (Qwen2.5-VL)
    patch_inputs: int  # numbers one patch embedding takes: channels x pixels of a patch (x frames)
    cls: bool  # a [CLS] token leads every sequence (CLIP)
    feature_layer: int  # the layer whose output the LLM receives
    fold: int  # encoder patches per projected token: 1, 2x2 (Qwen's merger), s x s (SmolVLM's pixel shuffle)
    projector: tuple[int, ...]  # the widths of the projector's linear layers, input first, for one token
    windowed: tuple[int, ...] = ()  # layers that attend within windows (Qwen2.5-VL); the rest over whole sequences
    copies: int = 1  # projectors run side by side on every token (Qwen3-VL: the merger and its DeepStack mergers)
    heads: int = 0  # attention heads, for merging inside it (ToMe matches keys averaged over them); 0: unknown

    @classmethod
    def of(cls, config) -> Encoder:
        """The vision encoder of a model, from its (composite) transformers config: CLIP (LLaVA-1.5,
        LLaVA-NeXT), SigLIP (LLaVA-OneVision, SmolVLM and Idefics3), the Qwen2-VL and Qwen2.5-VL ViTs."""
        v, text = config.vision_config, config.get_text_config().hidden_size
        if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
            return cls._qwen(v, config.model_type == "qwen2_5_vl")
        if config.model_type in ("qwen3_vl", "qwen3_vl_moe"):
            return cls._qwen3(v, len(v.deepstack_visual_indexes))
        if config.model_type in ("qwen3_5", "qwen3_5_moe"):  # Qwen3-VL's ViT and merger, without DeepStack
            return cls._qwen3(v, 0)
        if config.model_type == "internvl":
            return cls._internvl(v, text, round(1 / config.downsample_ratio) ** 2)
        sizes = dict(hidden=v.hidden_size, layers=v.num_hidden_layers, mlp=v.intermediate_size, mlp_matrices=2)
        sizes |= dict(heads=v.num_attention_heads)
        sizes |= dict(patch_inputs=v.num_channels * v.patch_size**2)
        if config.model_type in ("idefics3", "smolvlm"):  # pixel shuffle: s x s patches side by side, one linear layer
            s2 = config.scale_factor**2
            return cls(
                **sizes, cls=False, feature_layer=v.num_hidden_layers - 1, fold=s2, projector=(v.hidden_size * s2, text)
            )
        if config.model_type == "gemma3":  # SigLIP; 4x4 patches average-pooled into a token, then one matrix
            fold = (v.image_size // v.patch_size) ** 2 // config.mm_tokens_per_image
            return cls(
                **sizes, cls=False, feature_layer=v.num_hidden_layers - 1, fold=fold, projector=(v.hidden_size, text)
            )
        selected = config.vision_feature_layer  # LLaVA: a hidden_states index; the layer below it makes it
        feature = v.num_hidden_layers + selected if selected < 0 else selected - 1
        clip = v.model_type == "clip_vision_model"  # SigLIP (LLaVA-OneVision) has no [CLS]
        return cls(**sizes, cls=clip, feature_layer=feature, fold=1, projector=(v.hidden_size, text, text))

    @classmethod
    def _qwen(cls, v, qwen25: bool) -> Encoder:
        """The Qwen2-VL ViT of vision config `v` (Qwen2.5-VL's: a gated MLP, and attention within windows but
        in its full-attention blocks), and its merger: 2x2 patches side by side, then a 2-layer MLP."""
        hidden = v.hidden_size if qwen25 else v.embed_dim
        merged = hidden * v.spatial_merge_size**2
        out = v.out_hidden_size if qwen25 else v.hidden_size
        return cls(
            hidden=hidden,
            layers=v.depth,
            mlp=v.intermediate_size if qwen25 else int(hidden * v.mlp_ratio),
            mlp_matrices=3 if qwen25 else 2,
            patch_inputs=v.in_channels * v.temporal_patch_size * v.patch_size**2,
            cls=False,
            feature_layer=v.depth - 1,
            fold=v.spatial_merge_size**2,
            projector=(merged, merged, out),
            windowed=tuple(i for i in range(v.depth) if i not in v.fullatt_block_indexes) if qwen25 else (),
        )

    @classmethod
    def _qwen3(cls, v, deepstack: int) -> Encoder:
        """The Qwen3-VL ViT of vision config `v` (a plain MLP, whole-image attention) and its mergers: the
        one whose output is the LLM's input and one per DeepStack layer (`deepstack` of them), each 2x2 patches
        side by side, then a 2-layer MLP."""
        merged = v.hidden_size * v.spatial_merge_size**2
        return cls(
            hidden=v.hidden_size,
            layers=v.depth,
            mlp=v.intermediate_size,
            mlp_matrices=2,
            patch_inputs=v.in_channels * v.temporal_patch_size * v.patch_size**2,
            cls=False,
            feature_layer=v.depth - 1,
            fold=v.spatial_merge_size**2,
            projector=(merged, merged, v.out_hidden_size),
            copies=1 + deepstack,
        )

    @classmethod
    def _internvl(cls, v, text: int, fold: int) -> Encoder:
        """InternViT of vision config `v` ([CLS] first, a plain MLP, patches of (height, width) px) and
        InternVL's projector: `fold` patches side by side (its pixel shuffle), a layer norm, then a 2-layer MLP
        into the LLM's width."""
        return cls(
            hidden=v.hidden_size,
            layers=v.num_hidden_layers,
            mlp=v.intermediate_size,
            mlp_matrices=2,
            patch_inputs=v.num_channels * v.patch_size[0] * v.patch_size[1],
            cls=True,
            feature_layer=v.num_hidden_layers - 1,
            fold=fold,
            projector=(v.hidden_size * fold, text, text),
            heads=v.num_attention_heads,
        )


@dataclass(frozen=True)
class VisionPass:
    """What one image's vision stage runs on, from the real counts. A real checkpoint of the family sees
    the same sequences as its small stand-in where the processor geometry is the same, which it is for the
    tiny-* models (built with their checkpoint's processor settings)."""

    sequences: tuple[int, ...]  # patches of each sequence attended over as a whole: a crop, a tile, an image
    windows: tuple[int, ...] = ()  # patches of each window, in the layers that attend within windows
    projected: int | None = None  # tokens the projector runs on; None: every token the encoder makes
    maps: tuple[str, ...] = ()  # the vision signals the hooks capture (cls@feature, ...): attention is recomputed
    merged: int = 0  # tokens projected once more, as the mix of the tokens they absorbed
    # merging inside the encoder (tome-vit): per sequence, the tokens folded away after each block 0, 1, ...
    merges: tuple[tuple[int, ...], ...] = ()
    mergeable: tuple[int, ...] = ()  # and, per sequence, the tokens that may merge ([CLS] and padding never do)


@dataclass(frozen=True)
class VisionFlops:
    """FLOPs of a vision stage, 2 per multiply-add of every matrix product and convolution, as
    torch.utils.flop_counter counts them; norms, activations, softmax and resampling left out."""

    encoder: int  # patch embedding and every layer
    maps: int  # the attention maps recomputed for the method (softmax(q.k) per asked layer)
    projector: int

    @property
    def total(self) -> int:
        return self.encoder + self.maps + self.projector


def vision_flops(encoder: Encoder, work: VisionPass) -> VisionFlops:
    """The FLOPs of the encoder on every sequence (q, k, v, o, the MLP, and q.k and the weighted sum of v
    over every pair of a sequence, or of a window in a windowed layer), of the attention maps the hooks
    recompute, and of the projector on the tokens it runs on. What ran is counted: where tokens merge
    inside the encoder (`VisionPass.merges`, tome-vit), each layer on the tokens its sequence still has
    after the merges of the blocks below it, plus the matching's products (`_matching_macs`) in `encoder`."""
    e, c = encoder, encoder.hidden
    lengths = [t + e.cls for t in work.sequences]  # (sequences,) tokens, [CLS] included
    macs = sum(work.sequences) * e.patch_inputs * c + _matching_macs(e, work)
    for i, entering in enumerate(_entering(e, work, lengths)):  # (sequences,) tokens into layer i
        pairs = sum(t * t for t in (work.windows if i in e.windowed else entering))
        macs += sum(entering) * (4 * c * c + e.mlp_matrices * c * e.mlp) + 2 * pairs * c
    maps = _map_macs(e, work, lengths)
    projected = sum(work.sequences) // e.fold if work.projected is None else work.projected
    # a merged token runs the first projector once more (Qwen3-VL mixes its DeepStack features after their mergers)
    projector = (projected * e.copies + work.merged) * sum(a * b for a, b in zip(e.projector, e.projector[1:]))
    return VisionFlops(2 * macs, 2 * maps, 2 * projector)


def _entering(encoder: Encoder, work: VisionPass, lengths: list[int]) -> list[list[int]]:
    """(layers,) of (sequences,): the tokens of each sequence that enter each encoder layer, all of them
    but those folded away after the blocks below (`VisionPass.merges`)."""
    merges = work.merges or [()] * len(lengths)
    return [[t - sum(m[:i]) for t, m in zip(lengths, merges)] for i in range(encoder.layers)]


def _matching_macs(encoder: Encoder, work: VisionPass) -> int:
    """Multiply-adds of ToMe's matching inside the encoder (`backends.encoder_merge`): a block that merges
    r of a sequence's M mergeable rows runs rounds of at most M // 2; each round compares its ceil(M / 2) A
    rows with its floor(M / 2) B rows, cosine on the keys averaged over the heads (hidden / heads wide)."""
    macs = 0
    for mergeable, merges in zip(work.mergeable, work.merges):
        for r in merges:
            while r:
                assert encoder.heads and mergeable > 1, "a merge needs the encoder's heads and two mergeable rows"
                macs += (mergeable + 1) // 2 * (mergeable // 2) * (encoder.hidden // encoder.heads)
                step = min(r, mergeable // 2)
                mergeable, r = mergeable - step, r - step
    return macs


def _map_macs(encoder: Encoder, work: VisionPass, lengths: list[int]) -> int:
    """Multiply-adds of the attention the hooks recompute (`backends.signals.attention_maps`): per asked
    layer, q.k of the [CLS] row (or, without one, of every query) once for "cls" and "cls-heads", once
    for "cls-onehead", and of one mean query for "cls-logits", over each sequence (or window) of the layer."""
    from backends.signals import CLS, CLS_HEADS, CLS_LOGITS, CLS_ONEHEAD, parse

    groups = {CLS: CLS, CLS_HEADS: CLS, CLS_ONEHEAD: CLS_ONEHEAD, CLS_LOGITS: CLS_LOGITS}  # kinds computed together
    asked = {parse(name.removeprefix("padded "), "", encoder.layers, encoder.feature_layer) for name in work.maps}
    computed = {(groups[kind], layer) for kind, layer in asked if kind in groups}  # keys, outputs: read as they are
    macs = 0
    for group, layer in computed:
        segments = work.windows if layer in encoder.windowed else lengths
        macs += sum((1 if encoder.cls or group == CLS_LOGITS else t) * t * encoder.hidden for t in segments)
    return macs


@dataclass(frozen=True)
class Footprint:
    """What one run costs on an architecture, computed: FLOPs of the vision stage and of the LLM's
    prefill (with a method's `FirstPass` before it, GemFilter's), bytes of the prompt's KV cache while
    decoding and of the weights."""

    vision_flops: int
    prefill_flops: int
    kv_bytes: int
    weight_bytes: int


def footprint(
    config,
    work: VisionPass,
    tokens: list[int],
    cached: list[int],
    itemsize: int,
    early_layer: Callable[[int], int] | None = None,
    whole: int = 0,
) -> Footprint:
    """The `Footprint` of a run on the architecture of `config` (a composite transformers config) whose
    vision stage runs on `work` and whose LLM layers hold tokens[l] tokens in the prefill and cached[l] in
    their caches, counted for another depth: layer l of `config`'s LLM holds what layer l x d / D of the
    run held (d, D the two depths), which keeps the mean over layers; a merging encoder's merges likewise
    (`over_blocks`). With `early_layer` (the method's: depth -> layer), a `FirstPass` over the `whole`
    prompt first, to that layer of `config`'s depth."""
    shape, encoder = Shape.of(config), Encoder.of(config)
    first = 0 if early_layer is None else first_pass_flops(shape, FirstPass(whole, early_layer(shape.layers)))
    return Footprint(
        vision_flops(encoder, over_blocks(work, encoder.feature_layer + 1)).total,
        prefill_flops(shape, stretch(tokens, shape.layers)) + first,
        kv_bytes(shape, stretch(cached, shape.layers), itemsize),
        parameters(config) * itemsize,
    )


def over_blocks(work: VisionPass, blocks: int) -> VisionPass:
    """`work` for an encoder that merges over `blocks` blocks (up to its feature layer): each sequence's
    merges spread over them as evenly as whole numbers allow, the later blocks taking one more, as
    tome-vit's schedule spreads them over any depth."""
    spread = [[sum(m) // blocks + (b >= blocks - sum(m) % blocks) for b in range(blocks)] for m in work.merges]
    return dataclasses.replace(work, merges=tuple(map(tuple, spread)))


def stretch(counts: list[int], depth: int) -> list[int]:
    """Per-layer counts of one LLM laid over `depth` layers in proportion: [a, b] over 4 -> [a, a, b, b]."""
    return [counts[layer * len(counts) // depth] for layer in range(depth)]


def parameters(config) -> int:
    """The weights of a model of `config`, counted from its matrices and embeddings (biases and norms
    left out, well under 1%): the LLM with its input and output embeddings (one when tied), the vision
    encoder with its position embeddings, and the projector."""
    s, e, v = Shape.of(config), Encoder.of(config), config.vision_config
    text = config.get_text_config()
    tied = text.tie_word_embeddings or getattr(config, "tie_word_embeddings", False)
    llm = sum(_layer_weights(s, layer) for layer in range(s.layers)) + (1 if tied else 2) * s.vocab * s.hidden
    positions = 0  # the Qwen ViT rotates; CLIP and SigLIP learn a position per patch (and [CLS])
    if config.model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):  # a learnt grid, resampled
        positions = v.num_position_embeddings * e.hidden
    elif config.model_type == "internvl":  # image and patch sizes as (height, width)
        positions = ((v.image_size[0] // v.patch_size[0]) * (v.image_size[1] // v.patch_size[1]) + 1) * e.hidden
    elif config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        positions = ((v.image_size // v.patch_size) ** 2 + e.cls) * e.hidden
    encoder = e.patch_inputs * e.hidden + positions + e.layers * (4 * e.hidden**2 + e.mlp_matrices * e.hidden * e.mlp)
    return llm + encoder + sum(a * b for a, b in zip(e.projector, e.projector[1:])) * e.copies
