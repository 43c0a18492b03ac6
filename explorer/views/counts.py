"""How many of an image's visual tokens a method keeps at a budget, and what that number counts: one
count, worded once, for the app's count line, the live picture and the last run.

    count(make("hired"), Budget(fraction=0.2), 2144, depth=32)   # "428 of 2144 visual tokens kept (20%)"

An llm-stage method's budget is the mean of visual tokens over the LLM's layers (or, with
`budget_after_cuts`, what its last cut leaves); its step before the LLM, where it has one, is counted as
the tokens that enter the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import Budget, Method
from ..engine.llm import least_mean

KEPT, ENTER, AFTER_CUTS, LAYER_MEAN = "kept", "enter the LLM", "left after the last cut", "per LLM layer on average"


@dataclass(frozen=True)
class Count:
    """K of N visual tokens, what K counts (`KEPT`, `ENTER`, `AFTER_CUTS`, `LAYER_MEAN`) and the budget
    it came from ("20%", "budget 300 tokens", "no reduction", ...)."""

    n: int
    kept: int | None  # None: an adaptive method picks its own count, known only once it has chosen
    counts: str
    budget: str
    least: float | None = None  # the least layer mean the method's cuts reach, when the budget is below it

    def __str__(self) -> str:
        return self._said(str(self.kept))

    def _said(self, kept: str) -> str:
        if self.kept is None:
            return f"{self.n} visual tokens ({self.budget})"
        return f"{kept} of {self.n} visual tokens {self.counts} ({self.budget})"

    def line(self, method: str, size: tuple[int, int]) -> str:
        """The count in a sentence about the image (markdown): the number in bold, what the layers see
        for a layer mean, and why the budget cannot be met when it cannot."""
        width, height = size
        said = self._said(f"**{self.kept}**") + f" for this {width}x{height} image"
        if self.counts != LAYER_MEAN:
            return said + "."
        said += f": the layers before {method}'s first cut see all {self.n}, later ones fewer."
        return said if self.least is None else f"{said} ⚠️ {method} cannot go below {self.least:.0f} on average here."


def count(chosen: Method, budget: Budget | None, n: int, depth: int, entering: int | None = None) -> Count:
    """What `chosen` keeps of n visual tokens at `budget` (None: it keeps everything or picks its own count,
    as `pipeline.method_for` gives it) in an LLM of `depth` layers; `entering`: the count of its step
    before the LLM when that is what is shown (the live picture of an llm-stage method's vision step, or
    what an adaptive method chose)."""
    if not chosen.budgeted:
        return Count(n, n, KEPT, "no reduction")
    if budget is None:
        said = "adaptive: the method chose how many" if entering else "adaptive: the method picks its own count"
        return Count(n, entering, KEPT, said)
    said = f"{100 * budget.fraction:g}%" if budget.fraction is not None else f"budget {budget.tokens} tokens"
    kept = budget.resolve(n)
    if chosen.stage == "vision":
        return Count(n, kept, KEPT, said)
    if entering is not None:
        return Count(n, entering, ENTER, said)
    if chosen.budget_after_cuts:
        return Count(n, kept, AFTER_CUTS, said)
    least = least_mean(chosen, depth, n)
    return Count(n, kept, LAYER_MEAN, said, least if kept < least else None)
