"""What the LLM's prefill costs on paper, from its config and the real token counts: FLOPs and the
bytes of the KV cache the decode works on (the one the prefill fills, or less where a method cuts it
after the prefill). The bench reports them beside the measured times, so a saving can be
checked against what the token counts promise."""

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
