"""Tokens merged inside a CLIP-like vision encoder, for real: layer hooks that shorten the sequence.

Model-agnostic. It needs the encoder's layers, called as transformers 5 calls CLIP's,
`layer(hidden_states, attention_mask, ...)`, each with `self_attn.k_proj`, and attention that adds a
float `attention_mask` to its logits (eager or sdpa). A batch of crops that merge alike (as many
tokens to merge and as many merges, so that they keep one length):

- after each block up to `last`, the method's `match` pairs rows by the block's keys (heads
  averaged, ToMe's metric); each source row is folded into its destination as the size-weighted mean
  of their outputs, and leaves the sequence, so every later block runs on fewer tokens;
- before every later block, log(size) of each row goes in as the attention mask, so that a row
  holding s patches counts as s keys (proportional attention).

A block folds at most half the rows it may merge in one round; when its share of the schedule is
more than that (a shallow encoder, a tiny budget), it runs further rounds, on the sum of the keys
each row holds, as ToMe's rounds after the encoder do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import ExplorerError
from .signals import HIDDEN_FEATURE, MERGED_AFTER, MERGED_INTO


@dataclass(frozen=True)
class Merging:
    """What a method that merges inside the vision encoder asks of the backend (`Backend.encode`)."""

    budgets: list[int]  # per partition of the geometry: tokens left after the feature layer
    match: Callable  # match(metric (M, d), r) -> (src, dst), (r,) each: rows of the M folded into others
    schedule: Callable  # schedule(merges, blocks) -> [r_0, ...]: how many rows to fold after each block
    proportional: bool = True  # whether later blocks weigh a row's keys by the patches it holds


@dataclass
class Trace:
    """What merging did to one crop's tokens."""

    mergeable: torch.Tensor  # (T_now,) bool: the rows that may still be merged, or merged into
    owner: torch.Tensor  # (T,) long: for each token that entered, the row that holds it now
    origin: torch.Tensor  # (T_now,) long: for each row, the token it started as (its own token)
    size: torch.Tensor  # (T_now,) float: how many tokens each row holds
    merged_after: torch.Tensor  # (T,) long: the block after which a token's own row was folded away, -1 never
    output: torch.Tensor | None = None  # (T_last, C) float32: block `last`'s output, merged

    @classmethod
    def start(cls, mergeable: torch.Tensor) -> Trace:
        n, device = len(mergeable), mergeable.device
        every = torch.arange(n, device=device)
        return cls(
            mergeable.clone(), every, every.clone(), torch.ones(n, device=device), torch.full((n,), -1, device=device)
        )

    def merge(self, x: torch.Tensor, metric: torch.Tensor, merges: int, block: int, match: Callable) -> torch.Tensor:
        """Fold `merges` of the rows of x (T_now, C) into others, matched on `metric` (T_now, d), in
        rounds of at most half the mergeable rows; returns the (T_now - merges, C) rows left."""
        dtype = x.dtype
        while merges:
            rows = self.mergeable.nonzero()[:, 0]  # (M,)
            r = min(merges, len(rows) // 2)
            src, dst = (rows[i.to(rows.device)] for i in match(metric[rows], r))
            metric = metric.index_add(0, dst, metric[src])  # a further round matches on the sum of the keys
            x, self.size, stay = fold(x, self.size, src, dst)
            moved = torch.cumsum(stay, 0) - 1  # (T_now,) old row -> new row
            row_of = torch.arange(len(stay), device=stay.device)
            row_of[src] = dst
            self.merged_after[self.origin[src]] = block
            self.owner = moved[row_of[self.owner]]
            self.origin, self.mergeable, metric = self.origin[stay], self.mergeable[stay], metric[stay]
            merges -= r
        return x.to(dtype)


def fold(x: torch.Tensor, size: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
    """Rows `src` of x (T, C) folded into rows `dst`, each the size-weighted mean of what it holds.
    Returns the (T - r, C) rows left, their (T - r,) sizes and (T,) bool: which rows stayed."""
    total = (x.float() * size[:, None]).index_add_(0, dst, x[src].float() * size[src, None])  # (T, C)
    size = size.clone().index_add_(0, dst, size[src])
    stay = torch.ones(len(x), dtype=torch.bool, device=x.device)
    stay[src] = False
    return (total / size[:, None])[stay], size[stay], stay


@contextmanager
def merging(layers: torch.nn.ModuleList, last: int, mergeable: torch.Tensor, merges: int, plan: Merging):
    """Merge `merges` of each crop's tokens by the end of block `last` while the `with` block runs one
    encoder pass over a batch of crops; yields their `Trace`s, filled during the pass.

    mergeable: (B, T) bool over the tokens that enter ([CLS] and padding False: they are never merged,
    nor merged into), as many in every crop, so that the crops keep the same length."""
    attention = layers[0].self_attn
    if "flash" in str(getattr(attention.config, "_attn_implementation", "")):
        raise ExplorerError("merging inside the vision encoder needs sdpa or eager attention, which take its size bias")
    (count,) = mergeable.sum(1).unique().tolist()  # as many in every crop
    if not 0 <= merges < max(count, 1):
        raise ExplorerError(f"cannot merge {merges} of the {count} tokens of a crop and keep one")
    traces = [Trace.start(m) for m in mergeable]
    metrics: list[torch.Tensor] = []
    rounds = plan.schedule(merges, last + 1)
    assert sum(rounds) == merges and len(rounds) == last + 1, "the schedule must fold `merges` rows over the blocks"

    def keys(module, args, k):  # k: (B, T_now, D)
        metrics[:] = k.unflatten(-1, (attention.num_heads, attention.head_dim)).float().mean(2)  # B x (T_now, d)

    def before(block: int):
        def hook(module, args, kwargs):
            if not plan.proportional or block == 0 or all(bool((t.size == 1).all()) for t in traces):
                return None
            bias = torch.stack([t.size.log() for t in traces]).to(args[0].dtype)[:, None, None, :]  # (B, 1, 1, T_now)
            if len(args) > 1:
                return (args[0], bias, *args[2:]), kwargs
            return args, {**kwargs, "attention_mask": bias}

        return hook

    def after(block: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T_now, C)
            x = torch.stack(
                [t.merge(h, m, rounds[block], block, plan.match) for t, h, m in zip(traces, hidden, metrics)]
            )
            if block == last:
                for t, rows in zip(traces, x):
                    t.output = rows.float()
            return (x, *output[1:]) if isinstance(output, tuple) else x

        return hook

    handles = []
    try:
        for block, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before(block), with_kwargs=True))
            if block <= last:
                handles.append(layer.self_attn.k_proj.register_forward_hook(keys))
                handles.append(layer.register_forward_hook(after(block)))
        yield traces
    finally:
        for handle in handles:
            handle.remove()


def merged(backend, prepared, plan: Merging) -> dict[str, torch.Tensor]:
    """The backend's vision encoder run with its tokens merged after every block up to the feature layer
    until each partition is down to its budget ([CLS] and the padding that unpadding removes are never
    merged); crops that merge alike (the same tokens, as many merges) run side by side. The signals, in
    LLM order:
    - HIDDEN_FEATURE: (N, C) the feature layer's output of the row that holds each token, merged;
    - MERGED_INTO: (N,) the token (index into N) that began the row holding each token, NaN for newlines;
    - MERGED_AFTER: (N,) the block after which a token's own row was folded into another, NaN if never."""
    device = backend.device
    source = prepared.source.to(device)  # (N,) rows of the flat encoder output, -1 for newlines
    pixels = backend.crops(prepared)  # (crops, 3, H, W)
    side = backend.model.config.vision_config.patch_size
    patches = (pixels.shape[-2] // side) * (pixels.shape[-1] // side)  # T': patches per crop
    first = 1 if backend.cls_token else 0
    flat = source[source >= 0]  # the rows that reach the LLM
    mergeable = torch.zeros(len(pixels), first + patches, dtype=torch.bool, device=device)  # (crops, T)
    mergeable[flat // patches, first + flat % patches] = True
    traces = [None] * len(pixels)
    for (merges, _), crops in _alike(prepared, plan, source, mergeable, patches).items():
        with merging(backend.encoder, backend.feature_layer, mergeable[crops], merges, plan) as done:
            backend.vision_tower(pixels[crops])
        for c, trace in zip(crops, done):
            traces[c] = trace
    into = torch.cat([t.origin[t.owner][first:] - first + c * patches for c, t in enumerate(traces)])  # flat rows
    token = torch.full((len(pixels) * patches,), -1, device=device)  # flat row -> index into N
    token[flat] = (source >= 0).nonzero()[:, 0]
    after = torch.cat([t.merged_after[first:] for t in traces]).float()

    def rows(values: torch.Tensor) -> torch.Tensor:  # (crops * T', ...) -> (N, ...) in LLM order
        return backend.tokens_of(prepared, values.view(len(pixels), patches, *values.shape[1:]), "concat")

    return {
        HIDDEN_FEATURE: rows(torch.cat([t.output[t.owner][first:] for t in traces])),
        MERGED_INTO: rows(token[into].float()).cpu(),
        MERGED_AFTER: rows(after.masked_fill(after < 0, math.nan)).cpu(),
    }


def _alike(prepared, plan: Merging, source, mergeable, patches: int) -> dict[tuple, list[int]]:
    """The crops that merge alike, by (merges, which tokens are mergeable): each crop merges down to its
    partition's budget (at least one token left)."""
    partition = prepared.geometry.partition.to(source.device)
    alike: dict[tuple, list[int]] = {}
    for c, real in enumerate(mergeable):
        members = (source >= 0) & (source // patches == c)  # (N,) its tokens (none: all padding)
        budget = plan.budgets[int(partition[members][0])] if members.any() else 0
        merges = max(int(real.sum()) - max(budget, 1), 0)
        alike.setdefault((merges, tuple(real.tolist())), []).append(c)
    return alike
