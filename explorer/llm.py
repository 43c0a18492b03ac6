"""Methods that prune inside the LLM (stage "llm"): their cuts, the choices the backend's hooks ask
for during the prefill, and the selection and token counts those add up to.

A method that also reduces before the LLM (MustDrop, AIM: `select_vision`, see `explorer.methods`)
hands the LLM only the K tokens its vision step kept; the hooks then see those K, and `LlmStage`
widens what they read back to the N tokens of the image (NaN for the tokens gone before the LLM), so
that the method's `select` always works on indices into N."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch

from backends.signals import LLM_ATTENTION, TEXT

from .core import ExplorerError, Geometry, Method, Selection, Signals


class LlmStage:
    """One run of an llm-stage method: `choose` is called by the hooks at every cut, in order."""

    def __init__(
        self, name: str, method: Method, geometry: Geometry, budget: int, depth: int, before: Selection | None = None
    ):
        self.method, self.geometry, self.depth = method, geometry, depth
        n = len(geometry)
        self.before = before  # what the method's vision step chose, if it has one
        self.entering = torch.arange(n) if before is None else before.keep.cpu()  # (K,) into N: what enters the LLM
        self.reduced = len(self.entering) < n
        self.adaptive = method.adaptive  # it keeps as many as its rule finds, at most each count
        self.cuts = method.cuts(depth, len(self.entering), budget)
        layers, tokens = [c.layer for c in self.cuts], [c.tokens for c in self.cuts]
        if not layers or not all(1 <= layer < depth for layer in layers):
            raise ExplorerError(
                f"{name}: cannot cut before layer(s) {layers}: the LLM has {depth} layers, so the cuts must "
                f"fall on layers 1 to {depth - 1}"
            )
        assert layers == sorted(set(layers)) and tokens == sorted(tokens, reverse=True)
        assert tokens[-1] == budget or self.adaptive
        # the first layer whose cache is cut to the last cut's tokens after the prefill (None: none is)
        self.compact_from = method.compact_from(self.cuts) if method.compact_from is not None else None
        self.chosen: list[Selection] = []  # per cut, as the method returned it
        self.final: Selection | None = None

    @property
    def compacts(self) -> bool:
        """Whether the caches may hold fewer tokens while decoding than the prefill left in them: the
        method compacts them and its last cut may drop a token."""
        return self.compact_from is not None and (self.adaptive or self.cuts[-1].tokens < len(self.entering))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(layer, score_layer) of every cut, for the backend's hooks."""
        return [(c.layer, c.score_layer) for c in self.cuts]

    def choose(self, cut: int, maps: dict[str, torch.Tensor], alive: torch.Tensor) -> torch.Tensor:
        """The tokens to keep at this cut: (K,) sorted indices into the N visual tokens."""
        if cut == 0:
            self.chosen, self.final = [], None  # a new pass over the whole prompt
        if self.reduced:  # the hooks see the K tokens that entered: widen to N
            maps = {name: self.widen(name, m) for name, m in maps.items()}
            alive = self.widen("alive", alive)
        if self.before is not None:  # its maps (MustDrop's key set) go on to every cut
            maps = {**self.before.maps, **maps}
        selection = self.method.select(Signals(self.geometry, self.cuts[cut].tokens, maps, alive))
        count, wanted = len(selection.keep), self.cuts[cut].tokens
        assert count <= wanted if self.adaptive else count == wanted, "an llm-stage method must meet its cut's count"
        self.chosen.append(selection)
        if not self.reduced:
            return selection.keep
        return torch.searchsorted(self.entering.to(selection.keep.device), selection.keep)  # (K',) into the K

    def widen(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """A signal over the K tokens that entered the LLM as one over the N tokens of the image: NaN
        (False for `alive`) for the tokens gone before it; the text signals as they are."""
        if name.startswith(TEXT):
            return values
        entering = self.entering.to(values.device)
        if name == LLM_ATTENTION:  # (H, T, K): the visual tokens on the last axis
            wide = values.new_full((*values.shape[:-1], len(self.geometry)), torch.nan)
            wide[..., entering] = values
            return wide
        wide = values.new_full((len(self.geometry), *values.shape[1:]), False if name == "alive" else torch.nan)
        wide[entering] = values
        return wide

    @property
    def done(self) -> bool:
        """Whether every cut has chosen (the prefill is over)."""
        return len(self.chosen) == len(self.cuts)

    def selection(self) -> Selection:
        """The tokens left after the last cut, with the scores of the layer that chose them; for several
        cuts also each cut's scores ("layer L", L the scoring layer). Where the cuts fell and what
        each kept is in `tokens()`."""
        if not self.done:  # before the prefill every token that entered the LLM is in the sequence
            return self.before or Selection(keep=torch.arange(len(self.geometry)))
        if self.final is None:
            self.final = self._combine()
        return self.final

    def _combine(self) -> Selection:
        last = self.chosen[-1]
        before = self.before or Selection(keep=self.entering)
        maps = {name: m.cpu() for name, m in {**before.maps, **last.maps}.items()}
        if len(self.cuts) > 1:
            scored = [(c, s) for c, s in zip(self.cuts, self.chosen) if s.scores is not None]
            maps.update({f"layer {c.score_layer}": s.scores.cpu() for c, s in scored})
        keep, groups = last.keep.cpu(), before.groups
        if groups is not None:  # a token merged before the LLM stays with its owner while the owner stays
            left = torch.zeros(len(groups), dtype=torch.bool)
            left[keep] = True
            groups = torch.where(left[groups.clamp(min=0)] & (groups >= 0), groups, -1)
        return Selection(
            keep=keep,
            scores=None if last.scores is None else last.scores.cpu(),
            groups=groups,
            budgets=before.budgets,
            maps=maps,
            stats={**before.stats, **last.stats},
        )

    def tokens(self) -> dict:
        """visual_per_layer: the visual tokens each LLM layer sees in the prefill; visual_layer_mean: their
        mean; visual_cached_per_layer: the visual tokens each layer's KV cache holds while decoding (fewer
        than it saw from `compact_from` to the last cut); llm_cuts; visual_entering: the tokens that
        entered the LLM."""
        per_layer = [len(self.entering)] * self.depth
        kept = [len(s.keep) for s in self.chosen] if self.done else [c.tokens for c in self.cuts]
        for c, k in zip(self.cuts, kept):
            per_layer[c.layer :] = [k] * (self.depth - c.layer)
        cached = list(per_layer)
        if self.compact_from is not None:
            last = self.cuts[-1].layer
            cached[self.compact_from : last] = [kept[-1]] * len(range(self.compact_from, last))
        cuts = [{"layer": c.layer, "scored_at": c.score_layer, "kept": k} for c, k in zip(self.cuts, kept)]
        return {
            "visual_per_layer": per_layer,
            "visual_cached_per_layer": cached,
            "visual_layer_mean": sum(per_layer) / self.depth,
            "llm_cuts": cuts,
            "visual_entering": len(self.entering),
        }


def llm_hooks(backend, prepared, name: str, method, budget: int, before: Selection | None = None):
    """An llm-stage method's `LlmStage` and the backend's hooks that cut for it while a `with` block
    runs (they yield the backend's record); (None, a context that does nothing) for other methods.
    `before`: what the method's vision step kept (the prompt the LLM gets holds only those tokens)."""
    if method.stage != "llm":
        return None, nullcontext()
    stage = LlmStage(name, method, prepared.geometry, budget, backend.depth, before)
    if stage.reduced:  # the hooks find the visual tokens of the prompt the LLM really gets
        ids = prepared.inputs["input_ids"][:, backend.staying(prepared, stage.before.keep)]
        prepared = dataclasses.replace(prepared, inputs={**prepared.inputs, "input_ids": ids})
    return stage, backend.pruning(
        prepared, stage.pairs, method.needs, stage.choose, method.keep_positions, compact_from=stage.compact_from
    )
