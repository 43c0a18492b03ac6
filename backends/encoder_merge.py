"""Tokens merged inside a CLIP-like vision encoder, for real: layer hooks that shorten the sequence.

Model-agnostic. It needs the encoder's layers, called as transformers 5 calls CLIP's,
`layer(hidden_states, attention_mask, ...)`, each with `self_attn.k_proj`, and attention that adds a
float `attention_mask` to its logits (eager or sdpa). One image (a batch of one crop) at a time:

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

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .base import ExplorerError


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

    owner: torch.Tensor  # (T,) long: for each token that entered, the row that holds it now
    origin: torch.Tensor  # (T_now,) long: for each row, the token it started as (its own token)
    size: torch.Tensor  # (T_now,) float: how many tokens each row holds
    merged_after: torch.Tensor  # (T,) long: the block after which a token's row was folded away, -1 never
    output: torch.Tensor | None = None  # (T_last, C) float32: block `last`'s output, merged


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
    """Merge `merges` of one crop's tokens by the end of block `last` while the `with` block runs one
    encoder pass over that crop; yields its `Trace`, filled during the pass.

    mergeable: (T,) bool over the tokens that enter ([CLS] and padding False: they are never merged,
    nor merged into)."""
    attention = layers[0].self_attn
    if "flash" in str(getattr(attention.config, "_attn_implementation", "")):
        raise ExplorerError("merging inside the vision encoder needs sdpa or eager attention, which take its size bias")
    if not 0 <= merges < max(int(mergeable.sum()), 1):
        raise ExplorerError(f"cannot merge {merges} of {int(mergeable.sum())} tokens and keep one")
    device = mergeable.device
    n = len(mergeable)
    trace = Trace(
        owner=torch.arange(n, device=device),
        origin=torch.arange(n, device=device),
        size=torch.ones(n, device=device),
        merged_after=torch.full((n,), -1, device=device),
    )
    state = {"mergeable": mergeable.clone(), "metric": None}
    rounds = plan.schedule(merges, last + 1)
    assert sum(rounds) == merges and len(rounds) == last + 1, "the schedule must fold `merges` rows over the blocks"

    def keys(module, args, k):  # k: (1, T_now, D)
        state["metric"] = k[0].unflatten(-1, (attention.num_heads, attention.head_dim)).float().mean(1)  # (T_now, d)

    def before(block: int):
        def hook(module, args, kwargs):
            if not plan.proportional or block == 0 or bool((trace.size == 1).all()):
                return None
            bias = trace.size.log().to(args[0].dtype)[None, None, None, :]  # (1, 1, 1, T_now) added to the logits
            if len(args) > 1:
                return (args[0], bias, *args[2:]), kwargs
            return args, {**kwargs, "attention_mask": bias}

        return hook

    def after(block: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (1, T_now, C)
            x, metric, left = hidden[0], state["metric"], rounds[block]
            while left:
                rows = state["mergeable"].nonzero()[:, 0]  # (M,)
                r = min(left, len(rows) // 2)
                src, dst = (rows[i.to(device)] for i in plan.match(metric[rows], r))
                metric = metric.index_add(0, dst, metric[src])  # a further round matches on the sum of the keys
                x, trace.size, stay = fold(x, trace.size, src, dst)
                x, metric = x.to(hidden.dtype), metric[stay]
                moved = torch.cumsum(stay, 0) - 1  # (T_now,) old row -> new row
                rows_of = torch.arange(len(stay), device=device)
                rows_of[src] = dst
                trace.merged_after[trace.origin[src]] = block
                trace.owner = moved[rows_of[trace.owner]]
                trace.origin, state["mergeable"] = trace.origin[stay], state["mergeable"][stay]
                left -= r
            if block == last:
                trace.output = x.float()
            x = x[None]
            return (x, *output[1:]) if isinstance(output, tuple) else x

        return hook

    handles = []
    try:
        for block, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before(block), with_kwargs=True))
            if block <= last:
                handles.append(layer.self_attn.k_proj.register_forward_hook(keys))
                handles.append(layer.register_forward_hook(after(block)))
        yield trace
    finally:
        for handle in handles:
            handle.remove()
