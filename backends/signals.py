"""What methods read, by name: the names, their parser, and the hooks that capture them in a vision encoder.

A vision signal is named <kind>@<layer>: <kind> one of KINDS, <layer> a vision encoder layer (0 = the
first), "feature" (the layer whose output the LLM receives), "feature-<k>" (k layers below it) or
"last". `explorer.core.Signals` says what each holds. "padded <name>" is a vision signal at every
position of every crop the encoder saw, padding included, and "encoder rows" says which of them each
visual token is. The LLM's signals (LLM) are read inside the LLM by `llm_prune`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from .errors import ExplorerError

CLS, CLS_HEADS, CLS_ONEHEAD, CLS_LOGITS = "cls", "cls-heads", "cls-onehead", "cls-logits"
ATTENTION = (CLS, CLS_HEADS, CLS_ONEHEAD, CLS_LOGITS)  # kinds recomputed from a layer's queries and keys
KEYS, HIDDEN = "keys", "hidden"  # a layer's key projections, its output
KINDS = (*ATTENTION, KEYS, HIDDEN)  # what the encoder hooks capture
FEATURE, LAST = "feature", "last"  # layers by role


def at(kind: str, layer: int | str) -> str:
    """The name of a vision signal: kind "cls", layer 0 -> "cls@0"."""
    return f"{kind}@{layer}"


# The vision signals methods read
CLS_0, CLS_FEATURE, CLS_LAST = at(CLS, 0), at(CLS, FEATURE), at(CLS, LAST)
CLS_LOGITS_LAST, CLS_ONEHEAD_LAST = at(CLS_LOGITS, LAST), at(CLS_ONEHEAD, LAST)
KEYS_FEATURE, KEYS_LAST = at(KEYS, FEATURE), at(KEYS, LAST)
HIDDEN_0, HIDDEN_FEATURE = at(HIDDEN, 0), at(HIDDEN, FEATURE)
FEATURES = "features"  # the projected features the LLM receives
# Every position of every crop the encoder saw, padding included (families whose every token is one patch)
PADDED = "padded "  # + a vision signal's name: its values at every encoder position, (crops, T', ...)
ROWS = "encoder rows"  # (N,) long: each visual token's row in the flat (crops * T') encoder output, -1 for none
# what a vision encoder that merges its tokens gives besides HIDDEN_FEATURE (see `encoder_merge.merged`)
MERGED_INTO, MERGED_AFTER = "merged into", "merged after"

# Inside the LLM; each but the attention also as "llm-text-<kind>", the same of the prompt's text
LLM_ATTENTION, LLM_KEYS, LLM_HIDDEN, LLM_EMBEDS, LLM_TRANSITION = (
    "llm-attention",
    "llm-keys",
    "llm-hidden",
    "llm-embeds",
    "llm-transition",
)
LLM_ROPE, LLM_POSITIONS = "llm-rope", "llm-positions"  # SparseVLM v2.0's RoPE-only map; prompt positions
LLM_RESIDUAL = "llm-residual"  # the hidden states entering the cut layer as they are, what a merge there mixes
LLM = (LLM_ATTENTION, LLM_KEYS, LLM_HIDDEN, LLM_EMBEDS, LLM_TRANSITION, LLM_ROPE, LLM_POSITIONS, LLM_RESIDUAL)
LLM_LOGITS = "llm-logits"  # read in a first pass through the LLM's first layers (`llm_prune.early_pass`)
TEXT = "llm-text-"  # the prefix of the text's signals
# Read off the run's prompt and a clip's frames by a CLIP model named after the @ (`prompt_clip`), not by the VLM
PROMPT_FRAME, PROMPT_PATCH = "prompt-frame", "prompt-patch"  # e.g. "prompt-frame@openai/clip-vit-large-patch14-336"


def padded(name: str) -> str:
    """The vision signal `name` at every position of every crop the encoder saw: "cls@feature" ->
    "padded cls@feature"."""
    return PADDED + name


def prompted(name: str) -> bool:
    """Whether `name` is a signal a CLIP model reads off the prompt and a clip's frames ("prompt-frame@<model>")."""
    return name.partition("@")[0] in (PROMPT_FRAME, PROMPT_PATCH)


def text_of(name: str) -> str:
    """The text's counterpart of an LLM signal: "llm-keys" -> "llm-text-keys"."""
    return TEXT + name.removeprefix("llm-")


CHUNK = 1 << 24  # attention scores materialised at once when the received attention is summed


def parse(name: str, family: str, layers: int, feature_layer: int) -> tuple[str, int]:
    """(kind, layer) of a vision signal name such as cls@0, keys@feature or hidden@last, for an encoder of
    `layers` layers whose `feature_layer` the LLM receives."""
    kind, _, layer = name.partition("@")
    if kind not in KINDS or not layer:
        given = ", ".join(at(kind, "<layer>") for kind in KINDS)
        raise ExplorerError(f"{family} cannot give the signal {name!r}; it gives {FEATURES}, {given}")
    if layer == FEATURE:
        return kind, feature_layer
    if layer.startswith(f"{FEATURE}-") and layer[8:].isdigit():  # k layers below the feature layer
        if int(layer[8:]) > feature_layer:
            raise ExplorerError(
                f"{name!r}: the feature layer is vision layer {feature_layer}, with {feature_layer} layers below it"
            )
        return kind, feature_layer - int(layer[8:])
    if layer == LAST:
        return kind, layers - 1
    if not layer.isdigit() or int(layer) >= layers:
        raise ExplorerError(f"{name!r}: the vision encoder has layers 0..{layers - 1}, feature, feature-<k> and last")
    return kind, int(layer)


def attention_maps(q: torch.Tensor, k: torch.Tensor, kinds: set[str], scale: float, cls: bool) -> dict:
    """The attention kinds asked of one layer, recomputed from its queries and keys.

    q, k: (B, T, heads, head_dim) float32, B independent sequences (crops, windows) of T tokens.
    With a [CLS] token (the first of T; q may hold its row alone): "cls" is its attention to the
    T-1 patches, heads summed; "cls-heads" the same per head; "cls-onehead" the same with the heads
    joined into one head over all channels, scaled by 1/sqrt(channels) (PruMerge's); "cls-logits"
    its row of q.k * scale before the softmax, heads averaged (GlobalCom2's). (B, T-1) each, (B, T-1,
    heads) for cls-heads.
    Without one (SigLIP, the Qwen ViT), as community ports do, the attention each token receives:
    "cls" is the mean over heads and queries of its column of softmax(q.k * scale); "cls-heads"
    the mean over queries, per head; "cls-onehead" the mean over queries with the heads joined into
    one; "cls-logits" the mean over heads and queries of q.k * scale, before the softmax. (B, T)
    each, (B, T, heads) for cls-heads.
    """
    out = {}
    b, t, h, d = k.shape
    if CLS_ONEHEAD in kinds:
        joined = _attention(q.reshape(b, -1, 1, h * d), k.reshape(b, t, 1, h * d), (h * d) ** -0.5, cls)
        out[CLS_ONEHEAD] = joined[:, 0]
    if kinds & {CLS, CLS_HEADS}:
        weights = _attention(q, k, scale, cls)  # (B, h, T')
        out[CLS] = weights.sum(1) if cls else weights.mean(1)
        out[CLS_HEADS] = weights.transpose(1, 2)  # (B, T', h)
    if CLS_LOGITS in kinds:
        rows = q[:, :1] if cls else q.mean(1, keepdim=True)  # (B, 1, h, d): mean of q.k over queries = (mean q).k
        logits = torch.einsum("bqhd,bthd->bht", rows, k) * scale  # (B, h, T)
        out[CLS_LOGITS] = logits.mean(1)[:, 1:] if cls else logits.mean(1)
    return {kind: out[kind] for kind in kinds if kind in out}


def _attention(q: torch.Tensor, k: torch.Tensor, scale: float, cls: bool) -> torch.Tensor:
    """(B, h, T-1): the [CLS] row of the softmax attention per head; or, without [CLS], (B, h, T): the
    attention each token receives, per head, averaged over the queries, CHUNK scores at a time."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, T_q, d), (B, h, T, d)
    if cls:
        return torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * scale, -1)[:, :, 0, 1:]
    b, h, t, _ = k.shape
    total = k.new_zeros(b, h, t)
    step = max(1, CHUNK // (b * h * t))
    for start in range(0, q.shape[2], step):
        total += torch.softmax(q[:, :, start : start + step] @ k.transpose(-1, -2) * scale, -1).sum(2)
    return total / q.shape[2]


class Taps(NamedTuple):
    """Where the hooks read an encoder layer: its attention module, and the modules in that which give the
    queries and the keys as the attention uses them (CLIP's and SigLIP's projections; InternViT's `attention`
    normalises them after projecting, `q_norm` and `k_norm`)."""

    attention: str = "self_attn"
    queries: str = "q_proj"
    keys: str = "k_proj"


CLIP_TAPS = Taps()  # CLIP's and SigLIP's


@contextmanager
def encoder_signals(layers: torch.nn.ModuleList, wants: dict[int, set[str]], cls: bool = True, taps: Taps = CLIP_TAPS):
    """Capture what methods read from chosen layers of a CLIP or SigLIP encoder during one forward pass.

    `wants` maps a layer to the kinds asked of it: the attention kinds of `attention_maps`, "keys"
    (the layer's key projections) and "hidden" (the layer's output). Attention is recomputed from
    the layer's own q/k projections (hooks on q_proj and k_proj, or the modules `taps` names), so the encoder keeps running its
    fast attention kernel. `cls`: whether the first token of each crop is a [CLS] token, which is
    then left out of every signal. Yields a dict filled during the forward pass: (kind, layer) ->
    float32 (crops, T', ...), T' the patches: (crops, T') for attention, (crops, T', heads, head_dim)
    for keys and (crops, T', channels) for hidden, nothing renormalised.
    """
    out: dict[tuple[str, int], torch.Tensor] = {}
    queries: dict[int, torch.Tensor] = {}
    first = 1 if cls else 0

    def on_q(layer):
        def hook(module, args, q):  # q: (crops, T, D)
            queries[layer] = q[:, :1] if cls else q  # [CLS] needs its own row only

        return hook

    def on_k(layer, kinds):
        attn = getattr(layers[layer], taps.attention)

        def hook(module, args, k):  # k: (crops, T, D)
            k = k.unflatten(-1, (attn.num_heads, attn.head_dim)).float()  # (crops, T, h, d)
            if KEYS in kinds:
                out[KEYS, layer] = k[:, first:]
            if layer in queries:
                q = queries.pop(layer).unflatten(-1, (attn.num_heads, attn.head_dim)).float()
                maps = attention_maps(q, k, kinds, attn.scale, cls)
                out.update({(kind, layer): m for kind, m in maps.items()})

        return hook

    def on_output(layer):
        def hook(module, args, hidden):  # hidden: (crops, T, C)
            out[HIDDEN, layer] = hidden[:, first:].float()

        return hook

    handles = []
    try:
        for layer, kinds in sorted(wants.items()):
            attention = getattr(layers[layer], taps.attention)
            if kinds & set(ATTENTION):
                handles.append(getattr(attention, taps.queries).register_forward_hook(on_q(layer)))
            if kinds & {*ATTENTION, KEYS}:
                handles.append(getattr(attention, taps.keys).register_forward_hook(on_k(layer, kinds)))
            if HIDDEN in kinds:
                handles.append(layers[layer].register_forward_hook(on_output(layer)))
        yield out
    finally:
        for handle in handles:
            handle.remove()
