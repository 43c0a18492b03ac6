"""Visual tokens pruned inside the LLM, for real: decoder-layer hooks that shorten the sequence.

Model-agnostic. It needs the decoder layers, called as transformers 5 calls them for Llama, Mistral,
Qwen2 and the VLMs built on them: `layer(hidden_states, attention_mask=..., position_ids=...,
past_key_values=..., position_embeddings=(cos, sin), ...)`, with the same keyword values for every
layer of one forward pass. A cut before layer K works like this:

- in a pass over the whole prompt (the prefill, or a run without a cache), the hooks of layers K and
  later index the hidden states, position ids, rotary cos/sin, a materialised attention mask and
  `cache_position` to the kept tokens, so those layers, and their KV caches, hold the short sequence;
  layers before K keep the full one;
- in a decode step the new token is left alone: each layer's cache already holds what it should. When
  positions are renumbered, the new token's position drops by the number of tokens cut before that
  layer (and cos/sin are recomputed for it); a materialised mask loses the columns of the cut tokens.

With `compact_from` (MustDrop's decode stage), the first decode step after a prefill also cuts the KV
caches of the layers from `compact_from` up to the last cut's layer down to the tokens left after the
last cut (their keys and values index-selected; a key keeps the rotary position it was cached with,
and the new tokens of a compacted layer keep the positions of that layer's cut group, so relative
positions stay what they were); those layers' masks then lose the columns of every token cut. Layer 0
is never compacted: the model sizes its masks and positions, and generate() its next input, from
layer 0's cache, which must count every token seen.

With `attend` (DyCoke's decode stage), every decode step chooses again which visual tokens the layers
from the last cut on attend to: at the last cut's scoring layer the new token's attention to the visual
tokens in that layer's cache goes to `attend`, and each later layer's cache holds only the rows chosen
while the layer runs (the text, the chosen visual tokens, the answer so far; a materialised mask loses
the other columns), then gets back every row it held, with the new token's: a token left out at one
step may be attended to at the next.

Kept tokens either keep their original positions (gaps where tokens went) or are renumbered: a token's
new position is its original one minus the tokens dropped before it.

The "llm-transition" signal (TransPrune's token transition variation) also hooks each layer's
attention and MLP, which are called as `self_attn(hidden_states=...)` and `mlp(hidden_states)`.

With `rerank` (a decode without a KV cache, where every generated token reruns the whole sequence),
every pass chooses again, and its text runs to the newest token. Without it, a pass longer than the
prompt (teacher forcing) reads the prompt's text alone, as the prefill did.

`early_pass` is another use of the same layers: a pass over the whole prompt stopped before a layer
runs, giving the last prompt token's raw query-key products there (GemFilter's first pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ExplorerError
from .signals import (
    LLM,
    LLM_ATTENTION,
    LLM_EMBEDS,
    LLM_HIDDEN,
    LLM_KEYS,
    LLM_LOGITS,
    LLM_POSITIONS,
    LLM_ROPE,
    LLM_TRANSITION,
    text_of,
)


@dataclass(frozen=True)
class Decoder:
    """What the hooks need from one model's language model."""

    layers: torch.nn.ModuleList  # decoder layers with .input_layernorm and .self_attn.{q,k}_proj
    rotary: torch.nn.Module  # rotary(x, position_ids) -> (cos, sin)
    norm: torch.nn.Module  # the final norm, applied to the "llm-hidden" signal
    rope: Callable  # the family's apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)
    # the rotary positions of the current pass, (..., 1, L), when they are not the layers' position_ids
    # (Qwen2-VL's 3-D M-RoPE positions; None when not known); renumbering moves every axis back by the
    # tokens cut before
    positions: Callable[[], torch.Tensor | None] | None = None
    qk_norm: bool = False  # attention normalises each head's queries and keys before RoPE (Qwen3's q_norm, k_norm)


@dataclass
class Record:
    """What the last pass over the whole prompt did."""

    keeps: list[torch.Tensor] = field(default_factory=list)  # per cut: (K_s,) kept visual tokens, indices into N
    # time the hooks spent scoring, choosing and cutting in every pass of the block (device synchronised)
    seconds: float = 0.0


@contextmanager
def pruning(
    decoder: Decoder,
    image: torch.Tensor,
    prompt: int,
    cuts: list[tuple[int, int]],
    needs: tuple[str, ...],
    choose: Callable,
    keep_positions: bool,
    compact_from: int | None = None,
    rerank: bool = False,
    attend: Callable | None = None,
):
    """Cut visual tokens inside the LLM while the `with` block runs; yields a `Record`.

    image: (N,) long, the prompt positions of the visual tokens in LLM order; prompt: its length L.
    cuts: (layer, score_layer) pairs, layers increasing: tokens are cut before `layer`, and scored from
    the queries and keys of `score_layer`, which is `layer` or the one before.
    needs: the signals to compute (see `signals.LLM`); the text is the prompt after the last visual token.
    choose(cut, maps, alive) -> (K,) long, sorted indices into N of the tokens to keep, all alive.
    compact_from: the first layer whose KV cache is cut down to the tokens left after the last cut once
    the prefill is over (None: every layer keeps the cache its prefill filled); see the module's doc.
    rerank: every pass over the whole sequence reads its text up to its last token (see the module's doc).
    attend(maps, alive) -> (K,) long or None: at each decode step, from "llm-attention" (H, 1, N), the new
    token's attention at the last cut's scoring layer, the visual tokens (sorted indices into N, alive) the
    layers from the last cut on attend to in that step, None for all (see the module's doc).
    """
    unknown = set(needs) - set(LLM)
    if unknown:
        raise ExplorerError(f"signals {sorted(unknown)} cannot be read inside the LLM; it gives {', '.join(LLM)}")
    last = 0
    for layer, score_layer in cuts:
        if not (last <= score_layer <= layer and layer - 1 <= score_layer and 1 <= layer < len(decoder.layers)):
            raise ExplorerError(
                f"cannot cut before layer {layer} scored at layer {score_layer} (layers 1..{len(decoder.layers) - 1})"
            )
        last = layer
    if compact_from is not None and not 1 <= compact_from < len(decoder.layers):
        raise ExplorerError(
            f"cannot compact the caches from layer {compact_from}: layers 1..{len(decoder.layers) - 1} can be "
            "(layer 0's cache must hold every token, the model reads the sequence's length from it)"
        )
    if attend is not None and (compact_from is not None or rerank):
        raise ExplorerError("choosing at each decode step needs the caches as the prefill left them, with a cache")
    pruner = _Pruner(decoder, image, prompt, cuts, needs, choose, keep_positions, compact_from, rerank, attend)
    handles = []
    try:
        for index, layer in enumerate(decoder.layers):
            handles.append(layer.register_forward_pre_hook(pruner.hook(index), with_kwargs=True))
            if LLM_TRANSITION in needs:
                for part in (layer.self_attn, layer.mlp):
                    handles.append(part.register_forward_hook(pruner.transition(index), with_kwargs=True))
            if attend is not None and index >= cuts[-1][0]:
                handles.append(layer.register_forward_hook(pruner.restore(index), with_kwargs=True))
        yield pruner.record
    finally:
        for handle in handles:
            handle.remove()


class _Pruner:
    def __init__(
        self, decoder, image, prompt, cuts, needs, choose, keep_positions, compact_from=None, rerank=False, attend=None
    ):
        self.decoder, self.image, self.prompt, self.cuts = decoder, image, prompt, cuts
        self.needs, self.choose, self.keep_positions, self.rerank = needs, choose, keep_positions, rerank
        self.attend = attend
        self.attended: torch.Tensor | None = None  # (R,) with `attend`: the cache rows this decode step attends to
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> its whole cache while narrowed
        # the layers whose caches are cut to the last cut's tokens after the prefill: compact_from up to
        # the last cut's layer (those from it on hold only them already)
        self.compacted_layers = range(cuts[-1][0])[compact_from:] if compact_from is not None else range(0)
        self.compacted = False  # whether this prefill's caches have been cut
        self.text = torch.arange(int(image.max()) + 1, prompt, device=image.device)  # (T,) prompt after the image
        self.cut_at = {layer: s for s, (layer, _) in enumerate(cuts)}
        self.score_at = {score_layer: s for s, (_, score_layer) in enumerate(cuts)}
        self.busy = {*self.cut_at, *self.score_at, *([0] if LLM_EMBEDS in needs else [])}  # layers with work to do
        self.decode_at = {*self.cut_at, *self.compacted_layers[:1]}  # layers where a decode step's view changes
        self.record = Record()
        self.rows: list[torch.Tensor] = []  # per cut: prompt positions left after it, for decode steps

    def hook(self, layer: int):
        def before(module, args, kwargs):
            hidden = args[0]  # (1, L, D); decoder layers take the hidden states positionally
            if layer == 0:
                self.begin(hidden, kwargs)
            if self.full and layer in self.busy:
                _sync(hidden)  # so that only this work is timed
                start = time.perf_counter()
                hidden = self.prefill(layer, hidden, kwargs)
                _sync(hidden)
                self.record.seconds += time.perf_counter() - start
            elif not self.full:
                self.decode(layer, hidden, kwargs)
            return (hidden, *args[1:]), {**kwargs, **self.view}

        return before

    def begin(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """A new forward pass: over the whole prompt, or a decode step on the cache."""
        if hidden.shape[0] != 1:
            raise ExplorerError(
                "methods that prune inside the LLM take one image and prompt at a time: each sequence would "
                "keep different tokens, so a batch would need a ragged cache; run the prompts one by one"
            )
        cache = kwargs.get("past_key_values")
        self.full = cache is None or cache.get_seq_length(0) == 0
        self.view: dict = {}  # the keyword arguments layers get instead of the model's own
        self.attended = None
        if self.full:
            self.index = torch.arange(hidden.shape[1], device=hidden.device)  # (L,) positions still in the sequence
            self.alive = torch.ones(len(self.image), dtype=torch.bool, device=hidden.device)  # (N,)
            self.maps: dict[str, torch.Tensor] = {}
            self.record.keeps, self.rows = [], []
            if self.rerank:  # a pass without a cache: its last token is the newest
                self.text = torch.arange(int(self.image.max()) + 1, hidden.shape[1], device=self.image.device)
            self.ttv: torch.Tensor | None = None  # (L,) "llm-transition" summed so far, over the current sequence
            self.compacted = False
        elif not self.compacted:  # the first decode step after the prefill
            self.compact(cache)
            self.compacted = True

    def held(self, layer: int) -> torch.Tensor:
        """(L_l,) the prompt positions a layer's prefill left in its cache, sorted."""
        s = sum(cut <= layer for cut, _ in self.cuts) - 1  # its cut group; -1 before the first cut
        return self.rows[s] if s >= 0 else torch.arange(self.prompt, device=self.image.device)

    def compact(self, cache) -> None:
        """Cut the caches of the compacted layers down to the prompt positions left after the last cut,
        `rows[-1]`; each keeps its keys' rotary positions."""
        from transformers.cache_utils import DynamicLayer

        for layer in self.compacted_layers:
            store = cache.layers[layer]
            if type(store) is not DynamicLayer:  # not a sliding window's, nor a static cache
                raise ExplorerError(f"cutting the KV caches after the prefill needs a dynamic cache, not {store!r}")
            held = self.held(layer)
            assert store.keys.shape[-2] == len(held), "a compacted layer's cache holds what its prefill left"
            index = torch.searchsorted(held, self.rows[-1]).to(store.keys.device)
            store.keys, store.values = store.keys[:, :, index], store.values[:, :, index]

    def prefill(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if layer == 0 and LLM_EMBEDS in self.needs:
            self.maps.update(self.split(LLM_EMBEDS, hidden[0]))
        s = self.cut_at.get(layer)
        if s is not None:
            if self.cuts[s][1] == layer:
                self.score(layer, hidden, {**kwargs, **self.view})
            hidden = self.cut(s, hidden, kwargs)
        s = self.score_at.get(layer)
        if s is not None and self.cuts[s][0] != layer:
            self.score(layer, hidden, {**kwargs, **self.view})
        return hidden

    def split(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (L, C) over the current sequence -> the signal `name` (N, C), NaN rows for cut tokens, and
        its text counterpart (T, C)."""
        visual = x.new_full((len(self.image), x.shape[-1]), torch.nan)
        visual[self.alive] = x[torch.searchsorted(self.index, self.image[self.alive])]
        return {name: visual, text_of(name): x[torch.searchsorted(self.index, self.text)]}

    def score(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """The signals read from this layer's queries and keys, recomputed as the layer computes them."""
        block = self.decoder.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)  # (1, L, D)
        d, length = attn.head_dim, x.shape[1]
        rows = torch.searchsorted(self.index, self.text)  # (T,) the text rows in the current sequence
        cos, sin = kwargs["position_embeddings"]  # (1, L, d) each
        k = attn.k_proj(x).view(1, length, -1, d).transpose(1, 2)  # (1, H_kv, L, d)
        k = attn.k_norm(k) if self.decoder.qk_norm else k
        k = self.decoder.rope(k, k, cos, sin)[1]
        if LLM_KEYS in self.needs:
            self.maps.update(self.split(LLM_KEYS, k[0].transpose(0, 1).reshape(length, -1)))  # (L, H_kv * d)
        if LLM_ATTENTION in self.needs:
            q = attn.q_proj(x[:, rows]).view(1, len(rows), -1, d).transpose(1, 2)  # (1, H, T, d)
            q = attn.q_norm(q) if self.decoder.qk_norm else q
            q = self.decoder.rope(q, q, cos[:, rows], sin[:, rows])[0]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (1, H, L, d): grouped-query heads
            logits = q.float() @ k.float().transpose(-1, -2) * attn.scaling  # (1, H, T, L)
            future = torch.arange(length, device=x.device)[None, :] > rows[:, None]  # (T, L) causal mask
            a = torch.softmax(logits.masked_fill(future, -torch.inf), dim=-1)[0]  # (H, T, L)
            visual = a.new_full((*a.shape[:2], len(self.image)), torch.nan)  # (H, T, N)
            visual[:, :, self.alive] = a[:, :, torch.searchsorted(self.index, self.image[self.alive])]
            self.maps[LLM_ATTENTION] = visual
        if LLM_ROPE in self.needs:  # all-ones queries and keys through RoPE, as SparseVLM v2.0 builds them
            ones = x.new_ones(1, 1, length, d)  # (1, 1, L, d)
            k = self.decoder.rope(ones, ones, cos, sin)[1]
            q = self.decoder.rope(ones[:, :, rows], ones[:, :, rows], cos[:, rows], sin[:, rows])[0]  # (1, 1, T, d)
            rope = (q.float() @ k.float().transpose(-1, -2))[0, 0] / d**0.5  # (T, L)
            self.maps[LLM_ROPE] = self.split(LLM_ROPE, rope.T)[LLM_ROPE].T  # (T, N)

    def transition(self, layer: int):
        """A forward hook on a layer's attention or MLP that adds its token transition variation to
        "llm-transition", from the layer before the first cut to the one before the last: |output| /
        |input| times the softmax over the sequence of 1 - cos(input, output), the input being what the
        sublayer reads (normalised), the output what it adds to the residual stream."""

        def after(module, args, kwargs, output):
            if self.full and self.cuts[0][0] - 1 <= layer < self.cuts[-1][0]:
                x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[0].float()  # (L, D)
                y = (output[0] if isinstance(output, tuple) else output)[0].float()  # (L, D)
                direction = torch.softmax(1 - F.cosine_similarity(x, y, dim=-1), dim=0)
                ttv = y.norm(dim=-1) / x.norm(dim=-1) * direction  # (L,)
                self.ttv = ttv if self.ttv is None else self.ttv + ttv

        return after

    def cut(self, s: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if LLM_HIDDEN in self.needs:
            self.maps.update(self.split(LLM_HIDDEN, self.decoder.norm(hidden)[0]))
        if LLM_TRANSITION in self.needs:
            self.maps.update({name: m[:, 0] for name, m in self.split(LLM_TRANSITION, self.ttv[:, None]).items()})
        if LLM_POSITIONS in self.needs:
            self.maps |= {LLM_POSITIONS: self.image, text_of(LLM_POSITIONS): self.text}
        keep = self.choose(s, dict(self.maps), self.alive.clone()).to(hidden.device)  # (K,) indices into N
        alive = torch.zeros_like(self.alive)
        alive[keep] = True
        assert (keep.diff() > 0).all() and not (alive & ~self.alive).any(), "keep must be sorted alive tokens"
        stay = ~torch.isin(self.index, self.image[self.alive & ~alive])  # (L,) over the current sequence
        self.index, self.alive = self.index[stay], alive
        self.ttv = None if self.ttv is None else self.ttv[stay]
        self.rows.append(self.index[self.index < self.prompt])
        self.record.keeps.append(keep)
        self.view = self.prefill_view(kwargs, hidden)
        return hidden[:, stay]

    def prefill_view(self, kwargs: dict, hidden: torch.Tensor) -> dict:
        """The model's keyword arguments, over the whole sequence, cut to the positions left."""
        idx = self.index  # (L',) sorted original positions
        cut_before = idx - torch.arange(len(idx), device=idx.device)  # (L',) tokens cut before each one
        view = {"position_ids": self.place(kwargs["position_ids"][..., idx], cut_before)}  # (..., 1, L')
        if self.keep_positions:
            cos, sin = kwargs["position_embeddings"]  # (1, L, d)
            view["position_embeddings"] = (cos[:, idx], sin[:, idx])
        else:
            rotary = self.rotary_positions(kwargs)[..., idx]
            view["position_embeddings"] = self.decoder.rotary(hidden, self.place(rotary, cut_before))
        if kwargs.get("cache_position") is not None:
            view["cache_position"] = self.place(kwargs["cache_position"][idx], cut_before)
        if kwargs.get("attention_mask") is not None:
            view["attention_mask"] = _mask(kwargs["attention_mask"])[:, :, idx][..., idx]  # (1, 1, L', L')
        return view

    def decode_view(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        """The keyword arguments of a decode step for the layers from this one to the next in `decode_at`:
        the positions of the layer's cut group, the mask columns of what its cache holds."""
        view, held = {}, self.held(layer)
        if not self.keep_positions and len(held) < self.prompt:
            cut_before = self.prompt - len(held)  # every cut token came before the new ones
            view["position_ids"] = self.place(kwargs["position_ids"], cut_before)
            rotary = self.rotary_positions(kwargs)
            view["position_embeddings"] = self.decoder.rotary(hidden, self.place(rotary, cut_before))
            if kwargs.get("cache_position") is not None:
                view["cache_position"] = self.place(kwargs["cache_position"], cut_before)
        if kwargs.get("attention_mask") is not None:  # (1, 1, q, kv): the prompt's kept columns, then the rest
            mask = _mask(kwargs["attention_mask"])
            generated = torch.arange(self.prompt, mask.shape[-1], device=mask.device)
            columns = self.rows[-1] if layer in self.compacted_layers else held
            view["attention_mask"] = mask[..., torch.cat([columns.to(mask.device), generated])]
        return view

    def decode(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """A decode step's work before a layer: its view (`decode_view`); with `attend`, the choice at the last
        cut's scoring layer and, from the last cut on, the narrowed caches."""
        if layer in self.decode_at:
            self.view = self.decode_view(layer, hidden, kwargs)
        if self.attend is None:
            return
        last, score_layer = self.cuts[-1]
        if layer == score_layer:
            self.attended = self.attended_rows(layer, hidden, {**kwargs, **self.view})
        if layer >= last and self.attended is not None:
            store = kwargs["past_key_values"].layers[layer]
            self.saved[layer] = store.keys, store.values
            if layer == last and self.view.get("attention_mask") is not None:  # (1, 1, q, kv): the same columns
                mask = self.view["attention_mask"]
                new = torch.arange(store.keys.shape[-2], mask.shape[-1], device=mask.device)
                self.view["attention_mask"] = mask[..., torch.cat([self.attended.to(mask.device), new])]
            rows = self.attended.to(store.keys.device)
            store.keys, store.values = store.keys[:, :, rows], store.values[:, :, rows]

    def attended_rows(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """The new token's attention at this layer (softmax over its cache and itself, per head) to the visual
        tokens, handed to `attend`; (R,) the rows of the last cut's caches to attend to in this step (the
        prompt's but the visual tokens left out, then every generated one), None for all."""
        block, cache = self.decoder.layers[layer], kwargs["past_key_values"]
        attn = block.self_attn
        x = block.input_layernorm(hidden)  # (1, 1, D)
        d = attn.head_dim
        cos, sin = kwargs["position_embeddings"]  # (1, 1, d) each
        q = attn.q_proj(x).view(1, 1, -1, d).transpose(1, 2)  # (1, H, 1, d)
        k = attn.k_proj(x).view(1, 1, -1, d).transpose(1, 2)  # (1, H_kv, 1, d)
        if self.decoder.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.decoder.rope(q, k, cos, sin)
        keys = torch.cat([cache.layers[layer].keys, k], dim=-2)  # (1, H_kv, S + 1, d): the cache, then the new token
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # (1, H, S + 1, d)
        a = torch.softmax(q.float() @ keys.float().transpose(-1, -2) * attn.scaling, dim=-1)[0]  # (H, 1, S + 1)
        visual = a.new_full((*a.shape[:2], len(self.image)), torch.nan)  # (H, 1, N)
        visual[..., self.alive] = a[..., torch.searchsorted(self.held(layer), self.image[self.alive])]
        keep = self.attend({LLM_ATTENTION: visual}, self.alive.clone())
        if keep is None:
            return None
        attended = torch.zeros_like(self.alive)
        attended[keep.to(attended.device)] = True
        rows = self.rows[-1]  # (L',) the prompt positions the last cut's caches hold
        stay = ~torch.isin(rows, self.image[self.alive & ~attended])
        total = cache.layers[self.cuts[-1][0]].keys.shape[-2]  # the prompt's rows, then the generated ones
        return torch.cat([stay.nonzero()[:, 0], torch.arange(len(rows), total, device=rows.device)])

    def restore(self, layer: int):
        """A forward hook, with `attend`: a narrowed layer's cache gets back every row it held, then the new ones."""

        def after(module, args, kwargs, output):
            if layer in self.saved:
                store = kwargs["past_key_values"].layers[layer]
                keys, values = self.saved.pop(layer)
                new = store.keys.shape[-2] - len(self.attended)  # the rows this step added
                store.keys = torch.cat([keys, store.keys[:, :, -new:]], dim=-2)
                store.values = torch.cat([values, store.values[:, :, -new:]], dim=-2)

        return after

    def rotary_positions(self, kwargs: dict) -> torch.Tensor:
        """The positions the rotary embedding takes in this pass: the decoder's own (M-RoPE), else the layers'."""
        own = self.decoder.positions() if self.decoder.positions else None
        return kwargs["position_ids"] if own is None else own

    def place(self, positions: torch.Tensor, cut_before) -> torch.Tensor:
        """Original positions, or renumbered: minus the number of tokens cut before each."""
        return positions if self.keep_positions else positions - cut_before


class _Stopped(Exception):
    """Raised by `early_pass`'s hook to end the model's forward pass before the rest of its layers."""


def early_pass(decoder: Decoder, image: torch.Tensor, layer: int, forward: Callable[[], object]) -> dict:
    """Run `forward()` (the model on the whole prompt, without a cache) only until decoder layer `layer`
    is about to run, and give what a method reads there: "llm-logits", (H, L), the last prompt token's
    query times every prompt token's key at that layer, after RoPE, unscaled, per head (grouped-query
    keys repeated), and "llm-positions", the visual tokens' positions in the prompt (`image`)."""
    found = {}

    def before(module, args, kwargs):
        attn = module.self_attn
        x = module.input_layernorm(args[0])  # (1, L, D)
        d, length = attn.head_dim, x.shape[1]
        cos, sin = kwargs["position_embeddings"]  # (1, L, d) each
        k = attn.k_proj(x).view(1, length, -1, d).transpose(1, 2)  # (1, H_kv, L, d)
        k = attn.k_norm(k) if decoder.qk_norm else k
        k = decoder.rope(k, k, cos, sin)[1]
        q = attn.q_proj(x[:, -1:]).view(1, 1, -1, d).transpose(1, 2)  # (1, H, 1, d)
        q = attn.q_norm(q) if decoder.qk_norm else q
        q = decoder.rope(q, q, cos[:, -1:], sin[:, -1:])[0]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (1, H, L, d)
        found[LLM_LOGITS] = (q.float() @ k.float().transpose(-1, -2))[0, :, 0]  # (H, L)
        raise _Stopped

    handle = decoder.layers[layer].register_forward_pre_hook(before, with_kwargs=True)
    try:
        forward()
    except _Stopped:
        pass
    finally:
        handle.remove()
    return found | {LLM_POSITIONS: image}


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _mask(mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ExplorerError("pruning inside the LLM needs sdpa or eager attention (a 4-D mask or none)")
    return mask
