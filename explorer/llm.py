"""Methods that prune inside the LLM (stage "llm"): their cuts, the choices the backend's hooks ask
for during the prefill, and the selection and token counts those add up to."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .core import ExplorerError, Geometry, Selection, Signals


class LlmStage:
    """One run of an llm-stage method: `choose` is called by the hooks at every cut, in order."""

    def __init__(self, name: str, method, geometry: Geometry, budget: int, depth: int):
        self.method, self.geometry, self.depth = method, geometry, depth
        self.cuts = method.cuts(depth, len(geometry), budget)
        layers, tokens = [c.layer for c in self.cuts], [c.tokens for c in self.cuts]
        if not layers or not all(1 <= layer < depth for layer in layers):
            raise ExplorerError(
                f"{name}: cannot cut before layer(s) {layers}: the LLM has {depth} layers, so the cuts must "
                f"fall on layers 1 to {depth - 1}"
            )
        assert layers == sorted(set(layers)) and tokens == sorted(tokens, reverse=True) and tokens[-1] == budget
        self.chosen: list[Selection] = []  # per cut, as the method returned it
        self.final: Selection | None = None

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(layer, score_layer) of every cut, for the backend's hooks."""
        return [(c.layer, c.score_layer) for c in self.cuts]

    def choose(self, cut: int, maps: dict[str, torch.Tensor], alive: torch.Tensor) -> torch.Tensor:
        """The tokens to keep at this cut: (K,) sorted indices into the N visual tokens."""
        if cut == 0:
            self.chosen, self.final = [], None  # a new pass over the whole prompt
        selection = self.method.select(Signals(self.geometry, self.cuts[cut].tokens, maps, alive))
        assert len(selection.keep) == self.cuts[cut].tokens, "an llm-stage method must meet its cut's count"
        self.chosen.append(selection)
        return selection.keep

    @property
    def done(self) -> bool:
        """Whether every cut has chosen (the prefill is over)."""
        return len(self.chosen) == len(self.cuts)

    def selection(self) -> Selection:
        """The tokens left after the last cut, with the scores of the layer that chose them; for several
        cuts also each cut's scores ("layer L", L the scoring layer). Where the cuts fell and what
        each kept is in `tokens()`."""
        if not self.done:  # before the prefill every visual token is in the sequence
            return Selection(keep=torch.arange(len(self.geometry)))
        if self.final is None:
            self.final = self._combine()
        return self.final

    def _combine(self) -> Selection:
        last = self.chosen[-1]
        maps = {name: m.cpu() for name, m in last.maps.items()}
        if len(self.cuts) > 1:
            scored = [(c, s) for c, s in zip(self.cuts, self.chosen) if s.scores is not None]
            maps.update({f"layer {c.score_layer}": s.scores.cpu() for c, s in scored})
        return Selection(
            keep=last.keep.cpu(),
            scores=None if last.scores is None else last.scores.cpu(),
            maps=maps,
            stats=last.stats,
        )

    def tokens(self) -> dict:
        """visual_per_layer: the visual tokens each LLM layer sees; visual_layer_mean: their mean; llm_cuts."""
        per_layer = [len(self.geometry)] * self.depth
        for c in self.cuts:
            per_layer[c.layer :] = [c.tokens] * (self.depth - c.layer)
        cuts = [{"layer": c.layer, "scored_at": c.score_layer, "kept": c.tokens} for c in self.cuts]
        return {"visual_per_layer": per_layer, "visual_layer_mean": sum(per_layer) / self.depth, "llm_cuts": cuts}


def llm_hooks(backend, prepared, name: str, method, budget: int):
    """An llm-stage method's `LlmStage` and the backend's hooks that cut for it while a `with` block
    runs (they yield the backend's record); (None, a context that does nothing) for other methods."""
    if method.stage != "llm":
        return None, nullcontext()
    stage = LlmStage(name, method, prepared.geometry, budget, backend.depth)
    return stage, backend.pruning(prepared, stage.pairs, method.needs, stage.choose, method.keep_positions)
