"""What a run costs on paper, from the config and the real token counts: the FLOPs of the vision stage
(the encoder per crop, tile or frame, the attention maps the hooks recompute, the projector) and of the
LLM's prefill, the bytes of the KV cache the decode works on (the one the prefill fills, or less where a
method cuts it after the prefill) and of the weights. The bench and the app report them beside the
measured times, labelled computed, so a saving can be checked against what the token counts promise;
`footprint` gives the same for a real checkpoint's architecture at a small model's token counts."""

from __future__ import annotations

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

    @classmethod
    def of(cls, config) -> Shape:
        """The shape of a model's LLM, from its (composite) transformers config."""
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls(
            text.hidden_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            kv_heads,
            head_dim,
            text.intermediate_size,
            text.vocab_size,
        )


def prefill_flops(shape: Shape, tokens: list[int]) -> int:
    """FLOPs of the prefill when LLM layer l holds tokens[l] tokens (text and visual), counting 2 per
    multiply-add of every matrix product: the q, k, v and o projections, the gated MLP, q.k and the
    weighted sum of v over all tokens[l]^2 pairs, and the LM head on the last token only, as
    generate() computes it. This is what torch.utils.flop_counter counts; causal attention kernels
    skip about half of the pairs, and norms, RoPE and softmax are left out."""
    assert len(tokens) == shape.layers, "one token count per LLM layer"
    h, d = shape.hidden, shape.head_dim
    macs = sum(
        t * h * d * 2 * (shape.heads + shape.kv_heads) + 3 * t * h * shape.mlp + 2 * t * t * shape.heads * d
        for t in tokens
    )
    return 2 * (macs + h * shape.vocab)


def kv_bytes(shape: Shape, tokens: list[int], itemsize: int) -> int:
    """Bytes of the prompt's KV cache when layer l's cache holds tokens[l] tokens (after the prefill, or
    once a method has cut the caches for decoding): a key and a value of kv_heads x head_dim numbers of
    `itemsize` bytes per token of each layer. Every generated token adds the same to every run."""
    assert len(tokens) == shape.layers, "one token count per LLM layer"
    return sum(tokens) * 2 * shape.kv_heads * shape.head_dim * itemsize


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

    @classmethod
    def of(cls, config) -> Encoder:
        """The vision encoder of a model, from its (composite) transformers config: CLIP (LLaVA-1.5,
        LLaVA-NeXT), SigLIP (LLaVA-OneVision, SmolVLM and Idefics3), the Qwen2-VL and Qwen2.5-VL ViTs."""
        v, text = config.vision_config, config.get_text_config().hidden_size
        if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
            return cls._qwen(v, config.model_type == "qwen2_5_vl")
        if config.model_type in ("qwen3_vl", "qwen3_vl_moe"):
            return cls._qwen3(v)
        sizes = dict(hidden=v.hidden_size, layers=v.num_hidden_layers, mlp=v.intermediate_size, mlp_matrices=2)
        sizes |= dict(patch_inputs=v.num_channels * v.patch_size**2)
        if config.model_type in ("idefics3", "smolvlm"):  # pixel shuffle: s x s patches side by side, one linear layer
            s2 = config.scale_factor**2
            return cls(
                **sizes, cls=False, feature_layer=v.num_hidden_layers - 1, fold=s2, projector=(v.hidden_size * s2, text)
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
    def _qwen3(cls, v) -> Encoder:
        """The Qwen3-VL ViT of vision config `v` (a plain MLP, whole-image attention) and its mergers: the
        one whose output is the LLM's input and one per DeepStack layer, each 2x2 patches side by side, then
        a 2-layer MLP."""
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
            copies=1 + len(v.deepstack_visual_indexes),
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
    recompute, and of the projector on the tokens it runs on."""
    e, c = encoder, encoder.hidden
    lengths = [t + e.cls for t in work.sequences]  # (sequences,) tokens, [CLS] included
    tokens = sum(lengths)
    pairs = [sum(t * t for t in (work.windows if i in e.windowed else lengths)) for i in range(e.layers)]
    linear = tokens * (4 * c * c + e.mlp_matrices * c * e.mlp)
    macs = sum(work.sequences) * e.patch_inputs * c + sum(linear + 2 * p * c for p in pairs)
    maps = _map_macs(e, work, lengths)
    projected = sum(work.sequences) // e.fold if work.projected is None else work.projected
    # a merged token runs the first projector once more (Qwen3-VL mixes its DeepStack features after their mergers)
    projector = (projected * e.copies + work.merged) * sum(a * b for a, b in zip(e.projector, e.projector[1:]))
    return VisionFlops(2 * macs, 2 * maps, 2 * projector)


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
    prefill, bytes of the prompt's KV cache while decoding and of the weights."""

    vision_flops: int
    prefill_flops: int
    kv_bytes: int
    weight_bytes: int


def footprint(config, work: VisionPass, tokens: list[int], cached: list[int], itemsize: int) -> Footprint:
    """The `Footprint` of a run on the architecture of `config` (a composite transformers config) whose
    vision stage runs on `work` and whose LLM layers hold tokens[l] tokens in the prefill and cached[l] in
    their caches, counted for another depth: layer l of `config`'s LLM holds what layer l x d / D of the
    run held (d, D the two depths), which keeps the mean over layers."""
    shape = Shape.of(config)
    return Footprint(
        vision_flops(Encoder.of(config), work).total,
        prefill_flops(shape, stretch(tokens, shape.layers)),
        kv_bytes(shape, stretch(cached, shape.layers), itemsize),
        parameters(config) * itemsize,
    )


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
    layer = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads) + 3 * s.hidden * s.mlp
    llm = s.layers * layer + (1 if tied else 2) * s.vocab * s.hidden
    positions = 0  # the Qwen ViT rotates; CLIP and SigLIP learn a position per patch (and [CLS])
    if config.model_type in ("qwen3_vl", "qwen3_vl_moe"):  # a learnt grid, resampled to each image's
        positions = v.num_position_embeddings * e.hidden
    elif config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        positions = ((v.image_size // v.patch_size) ** 2 + e.cls) * e.hidden
    encoder = e.patch_inputs * e.hidden + positions + e.layers * (4 * e.hidden**2 + e.mlp_matrices * e.hidden * e.mlp)
    return llm + encoder + sum(a * b for a, b in zip(e.projector, e.projector[1:])) * e.copies
