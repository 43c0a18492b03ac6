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

With `mix` (HoliTom's merge inside the LLM), a cut may also merge: before its layer, each kept visual
token's hidden state becomes a weighted sum of the hidden states of the visual tokens still there (the
residual stream as it is, not normalised), then the sequence is cut as above; its KV caches hold the mixes.

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
    LLM_RESIDUAL,
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
    gated_query: bool = False  # q_proj gives each head's query, then its output gate (Qwen3.5's gated attention)
    # layers that keep a recurrent state instead of a KV cache (Qwen3.5's linear attention): the backend refuses
    # what needs their attention or cuts their caches; `explorer.methods.unavailable` refuses such methods by name
    recurrent: tuple[int, ...] = ()
    # each layer's kind, when the kinds get masks and rotary embeddings of their own (Gemma 3's "sliding_attention"
    # and "full_attention"); empty when every layer gets the same. With kinds, the arguments a cut narrows are
    # narrowed again from the layer's own at each change of kind, and `rotary` takes the kind: rotary(x, ids, kind)
    kinds: tuple[str, ...] = ()

    def queries(self, attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(1, H, L, d) the attention's queries of x (1, L, D) before RoPE, normalised per head when it does so;
        with `gated_query`, the first half of each head's q_proj output (the second is the head's output gate)."""
        d = attn.head_dim
        q = attn.q_proj(x).view(1, x.shape[1], -1, 2 * d if self.gated_query else d)[..., :d].transpose(1, 2)
        return attn.q_norm(q) if self.qk_norm else q


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
    mix: Callable | None = None,
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
    mix(cut) -> (K, N) sparse float or None, asked right after `choose` at that cut: kept token keep[k]
    enters the cut layer as sum_j mix[k, j] * h_j, h the hidden states there, j alive tokens (None: as it is).
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
    pruner = _Pruner(decoder, image, prompt, cuts, needs, choose, keep_positions, compact_from, rerank, attend, mix)
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
        self,
        decoder,
        image,
        prompt,
        cuts,
        needs,
        choose,
        keep_positions,
        compact_from=None,
        rerank=False,
        attend=None,
        mix=None,
    ):
        self.decoder, self.image, self.prompt, self.cuts = decoder, image, prompt, cuts
        self.needs, self.choose, self.keep_positions, self.rerank = needs, choose, keep_positions, rerank
        self.attend, self.mix = attend, mix
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
            self.layer = layer
            if self.view and self.new_kind(layer):  # narrow this kind's own arguments
                self.view = self.prefill_view(kwargs, hidden) if self.full else self.decode_view(layer, hidden, kwargs)
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
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        for layer in self.compacted_layers:
            store = cache.layers[layer]
            # a sliding window's cache that has not slid yet holds every token, as a dynamic one (Gemma 3's)
            unslid = type(store) is DynamicSlidingWindowLayer and store.cumulative_length < store.sliding_window
            if type(store) is not DynamicLayer and not unslid:  # not a sliding window's, nor a static cache
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
            q = self.decoder.queries(attn, x[:, rows])  # (1, H, T, d)
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
        if LLM_RESIDUAL in self.needs:
            self.maps.update(self.split(LLM_RESIDUAL, hidden[0]))
        if LLM_TRANSITION in self.needs:
            self.maps.update({name: m[:, 0] for name, m in self.split(LLM_TRANSITION, self.ttv[:, None]).items()})
        if LLM_POSITIONS in self.needs:
            self.maps |= {LLM_POSITIONS: self.image, text_of(LLM_POSITIONS): self.text}
        keep = self.choose(s, dict(self.maps), self.alive.clone()).to(hidden.device)  # (K,) indices into N
        weights = self.mix(s) if self.mix is not None else None  # (K, N) sparse, or None
        hidden = hidden if weights is None else self.mixed(hidden, keep, weights)
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

    def mixed(self, hidden: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden (1, L, D) with each kept visual token's row replaced by its mix, sum_j weights[k, j] * h_j
        over the visual tokens j alive at this cut, summed in float32 (`weights` (K, N) sparse)."""
        w = weights.coalesce()
        rows, columns = w.indices().to(hidden.device)  # (E,) each: entry e adds token columns[e] into keep[rows[e]]
        assert self.alive[columns].all(), "a merge mixes tokens still in the sequence"
        values = w.values().to(hidden.device, torch.float32)  # (E,)
        place = torch.searchsorted(self.index, self.image)  # (N,) each alive visual token's row in the sequence
        sources = hidden[0, place[columns]].float() * values[:, None]  # (E, D)
        mixes = sources.new_zeros(len(keep), hidden.shape[-1]).index_add_(0, rows, sources)  # (K, D)
        hidden = hidden.clone()
        hidden[0, place[keep]] = mixes.to(hidden.dtype)
        return hidden

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
            view["position_embeddings"] = self.rotary(hidden, self.place(rotary, cut_before))
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
            view["position_embeddings"] = self.rotary(hidden, self.place(rotary, cut_before))
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
        q = self.decoder.queries(attn, x)  # (1, H, 1, d)
        k = attn.k_proj(x).view(1, 1, -1, d).transpose(1, 2)  # (1, H_kv, 1, d)
        k = attn.k_norm(k) if self.decoder.qk_norm else k
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

    def new_kind(self, layer: int) -> bool:
        """Whether the layer's kind differs from the layer's before it (`Decoder.kinds`), and so its mask and rotary embedding."""
        kinds = self.decoder.kinds
        return bool(kinds) and layer > 0 and kinds[layer] != kinds[layer - 1]

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at these positions: the decoder's rotary embedding, of the current layer's kind when kinds differ."""
        if self.decoder.kinds:
            return self.decoder.rotary(hidden, positions, self.decoder.kinds[self.layer])
        return self.decoder.rotary(hidden, positions)

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
        q = decoder.queries(attn, x[:, -1:])  # (1, H, 1, d)
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
