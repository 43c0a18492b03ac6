"""Methods that prune inside the LLM (stage "llm"): their cuts, the choices the backend's hooks ask
for during the prefill, and the selection and token counts those add up to.

The budget B of such a method is, by default, the mean number of visual tokens over the LLM's layers,
counted by what each layer sees in the prefill (`layer_mean`): the papers compare methods that prune
inside the LLM so (SparseVLM's and PyramidDrop's "192 tokens", DART's and PyramidDrop's FastV rows),
and at equal B they do about the same LLM work. `plan` turns it into cuts: the method's own
`mean_cuts`, or else the largest count left after the last cut whose cuts keep the mean at most B.
With the method's `budget_after_cuts` setting, B is what the last cut leaves.

A method that also reduces before the LLM (MustDrop, AIM: `select_vision`, see `explorer.methods`)
hands the LLM only the K tokens its vision step kept; the hooks then see those K, and `LlmStage`
widens what they read back to the N tokens of the image (NaN for the tokens gone before the LLM), so
that the method's `select` always works on indices into N. A cut may also merge (HoliTom): the weights
of its selection (`Selection.mixes` "llm-residual") go to the hooks (`LlmStage.mix`), which mix the
hidden states there before cutting, and its `groups` say where each merged token went."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch

from backends.signals import LLM_ATTENTION, LLM_RESIDUAL, LLM_ROPE, TEXT

from ..core import Cut, ExplorerError, Geometry, Method, Selection, Signals


def per_layer(cuts: list[Cut], n: int, depth: int) -> list[int]:
    """The visual tokens each of the `depth` layers sees when `n` enter and each cut leaves its count
    from its layer on."""
    seen = [n] * depth
    for cut in cuts:
        seen[cut.layer :] = [cut.tokens] * (depth - cut.layer)
    return seen


def layer_mean(cuts: list[Cut], n: int, depth: int) -> float:
    """The mean of `per_layer`: the visual tokens per layer on average."""
    return sum(per_layer(cuts, n, depth)) / depth


def plan(method: Method, depth: int, n: int, budget: int, name: str = "") -> list[Cut]:
    """The cuts of an llm-stage method when `n` visual tokens enter the LLM, for its budget B (a layer
    mean, unless it counts B after its cuts or picks its own count)."""
    layers = [c.layer for c in method.cuts(depth, n, budget)]
    if not layers or not all(1 <= layer < depth for layer in layers):
        raise ExplorerError(
            f"{name}: cannot cut before layer(s) {layers}: the LLM has {depth} layers, so the cuts must "
            f"fall on layers 1 to {depth - 1}"
        )
    if method.budget_after_cuts or method.adaptive:
        return method.cuts(depth, n, budget)
    if method.mean_cuts is not None:
        return method.mean_cuts(depth, n, budget)
    last = last_count(method, depth, n, budget, fixed=True)
    if last is None:
        least = layer_mean(method.cuts(depth, n, 1), n, depth)
        raise ExplorerError(
            f"{name or 'this method'}: a budget of {budget} visual tokens per LLM layer on average is less than "
            f"its cuts can reach with the {n} visual tokens that enter the LLM: the layers before its first cut "
            f"see them all, so even keeping 1 token after its cuts averages {least:.1f} over the {depth} layers. "
            "Raise the budget, or set budget_after_cuts=true to count the budget as the tokens left after the last cut"
        )
    return method.cuts(depth, n, last)


def last_count(method: Method, depth: int, n: int, budget: int, fixed: bool = False) -> int | None:
    """The largest count b the last cut may leave for the layer mean to be at most `budget`, when the n
    tokens of the image, or `method.entering(n, b)` of them (unless `fixed`: n), enter the LLM; None when
    no b does. The mean grows with b, so this is a bisection."""

    def mean(b: int) -> float:
        entering = n if fixed else method.entering(n, b)
        return layer_mean(method.cuts(depth, entering, b), entering, depth)

    if mean(1) > budget:
        return None
    low, high = 1, n  # mean(low) <= budget; find the largest such b
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if mean(middle) <= budget else (low, middle - 1)
    return low


def least_mean(method: Method, depth: int, n: int) -> float:
    """The least mean visual tokens per layer an llm-stage method's cuts reach on an image of n tokens:
    1 left after its cuts, its step before the LLM leaving `method.entering(n, 1)`."""
    entering = method.entering(n, 1)
    return layer_mean(method.cuts(depth, entering, 1), entering, depth)


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
        self.cuts = plan(method, depth, len(self.entering), budget, name)
        layers, tokens = [c.layer for c in self.cuts], [c.tokens for c in self.cuts]
        assert all(1 <= layer < depth for layer in layers)
        assert layers == sorted(set(layers)) and tokens == sorted(tokens, reverse=True)
        assert 1 <= tokens[-1] <= len(self.entering) and tokens[0] <= len(self.entering)
        if method.budget_after_cuts and not self.adaptive:  # else B is the layer mean, met as near as counts allow
            assert tokens[-1] == budget
        # the first layer whose cache is cut to the last cut's tokens after the prefill (None: none is)
        self.compact_from = method.compact_from(self.cuts) if method.compact_from is not None else None
        self.chosen: list[Selection] = []  # per cut of the last whole pass, as the method returned it
        self.attended: list[int] = []  # with `decode_keep`: the visual tokens each decode step attended to
        self.previous: Signals | None = None  # with `decode_keep`: what the last decode step read
        self.pending: list[Selection] = []  # per cut of the pass under way
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
            self.pending = []  # a new pass over the whole prompt (with `rerank`, one per generated token)
            self.attended, self.previous = [], None
        if self.reduced:  # the hooks see the K tokens that entered: widen to N
            maps = {name: self.widen(name, m) for name, m in maps.items()}
            alive = self.widen("alive", alive)
        if self.before is not None:  # its maps (MustDrop's key set) go on to every cut
            maps = {**self.before.maps, **maps}
        selection = self.method.select(Signals(self.geometry, self.cuts[cut].tokens, maps, alive))
        count, wanted = len(selection.keep), self.cuts[cut].tokens
        assert count <= wanted if self.adaptive else count == wanted, "an llm-stage method must meet its cut's count"
        self.pending.append(selection)
        if len(self.pending) == len(self.cuts):  # the pass has chosen: what results read from now on
            self.chosen, self.final = self.pending, None
        if not self.reduced:
            return selection.keep
        return torch.searchsorted(self.entering.to(selection.keep.device), selection.keep)  # (K',) into the K

    def attend(self, maps: dict[str, torch.Tensor], alive: torch.Tensor) -> torch.Tensor | None:
        """A decode step of a method with `decode_keep`: the visual tokens the layers from its last cut on
        attend to in this step, (K,) sorted indices into the tokens that entered, None for all."""
        if self.reduced:
            maps = {name: self.widen(name, m) for name, m in maps.items()}
            alive = self.widen("alive", alive)
        signals = Signals(self.geometry, self.cuts[-1].tokens, maps, alive)
        keep = self.method.decode_keep(signals, self.previous)
        self.previous = signals
        self.attended.append(int(alive.sum()) if keep is None else len(keep))
        if keep is None or not self.reduced:
            return keep
        return torch.searchsorted(self.entering.to(keep.device), keep)

    def mix(self, cut: int) -> torch.Tensor | None:
        """For the hooks, right after `choose` at this cut: the merge weights of its selection when it mixes
        the hidden states there (`Selection.mixes` "llm-residual"), (K, K_in) sparse, the columns indices into
        the tokens that entered; None for a plain cut."""
        chosen = self.pending[cut]
        if chosen.weights is None:
            return None
        assert chosen.mixes == LLM_RESIDUAL, "a merge at a cut inside the LLM mixes the hidden states there"
        weights = chosen.weights.coalesce()
        if not self.reduced:
            return weights
        rows, columns = weights.indices()
        columns = torch.searchsorted(self.entering, columns)
        size = (len(chosen.keep), len(self.entering))
        return torch.sparse_coo_tensor(torch.stack([rows, columns]), weights.values(), size, check_invariants=True)

    def widen(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """A signal over the K tokens that entered the LLM as one over the N tokens of the image: NaN
        (False for `alive`) for the tokens gone before it; the text signals as they are."""
        if name.startswith(TEXT):
            return values
        entering = self.entering.to(values.device)
        if name in (LLM_ATTENTION, LLM_ROPE):  # (H, T, K), (T, K): the visual tokens on the last axis
            wide = values.new_full((*values.shape[:-1], len(self.geometry)), torch.nan)
            wide[..., entering] = values
            return wide
        empty = False if name == "alive" else torch.nan if values.is_floating_point() else -1
        wide = values.new_full((len(self.geometry), *values.shape[1:]), empty)
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
        if groups is not None or any(s.groups is not None for s in self.chosen):
            groups = self.followed(before)
        return Selection(
            keep=keep,
            scores=None if last.scores is None else last.scores.cpu(),
            groups=groups,
            budgets=before.budgets,
            maps=maps,
            stats={**before.stats, **last.stats},
        )

    def followed(self, before: Selection) -> torch.Tensor:
        """(N,) where each token went, followed through the cuts: a token merged before the LLM or at a cut
        (`Selection.groups`) goes with the token it merged into, wherever that goes; -1 where it was dropped."""
        n = len(self.geometry)
        if before.groups is not None:
            groups = before.groups.cpu()  # (N,)
        else:
            groups = torch.full((n,), -1)
            groups[self.entering] = self.entering
        for chosen in self.chosen:
            step = torch.full((n,), -1)  # where each token alive at this cut went
            step[chosen.keep.cpu()] = chosen.keep.cpu()
            step = step if chosen.groups is None else chosen.groups.cpu()
            groups = torch.where(groups >= 0, step[groups.clamp(min=0)], -1)
        return groups

    def tokens(self) -> dict:
        """visual_per_layer: the visual tokens each LLM layer sees in the prefill; visual_layer_mean: their
        mean; visual_cached_per_layer: the visual tokens each layer's KV cache holds while decoding (fewer
        than it saw from `compact_from` to the last cut); llm_cuts; visual_entering: the tokens that
        entered the LLM; with `decode_keep`, visual_attended_per_step: the visual tokens the layers from the
        last cut on attended to at each decode step."""
        kept = [len(s.keep) for s in self.chosen] if self.done else [c.tokens for c in self.cuts]
        made = [dataclasses.replace(c, tokens=k) for c, k in zip(self.cuts, kept)]  # an adaptive cut may keep fewer
        seen = per_layer(made, len(self.entering), self.depth)
        cached = list(seen)
        if self.compact_from is not None:
            last = self.cuts[-1].layer
            cached[self.compact_from : last] = [kept[-1]] * len(range(self.compact_from, last))
        cuts = [{"layer": c.layer, "scored_at": c.score_layer, "kept": k} for c, k in zip(self.cuts, kept)]
        attended = {"visual_attended_per_step": list(self.attended)} if self.method.decode_keep else {}
        return {
            "visual_per_layer": seen,
            "visual_cached_per_layer": cached,
            "visual_layer_mean": sum(seen) / self.depth,
            "llm_cuts": cuts,
            "visual_entering": len(self.entering),
        } | attended


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
    options = {"compact_from": stage.compact_from, "rerank": method.rerank}
    options |= {"attend": stage.attend} if method.decode_keep is not None else {}
    options |= {"mix": stage.mix}  # a cut that merges (`Selection.mixes` "llm-residual")
    return stage, backend.pruning(prepared, stage.pairs, method.needs, stage.choose, method.keep_positions, **options)
