"""FastV (Chen, Zhao, Liu, Bai, Lin, Zhou and Chang, "An Image is Worth 1/2 Tokens After Layer 2:
Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764,
github.com/pkunlp-icler/FastV).

Layers 0..K-1 of the LLM see every visual token. Before layer K, keep the R tokens that the last
prompt token attends to most at layer K-1, heads averaged; layer K and every later layer, and their
KV caches, hold only those. Kept tokens keep their original positions. The budget B is the mean
visual tokens over the LLM's layers, so R is the largest count with (K N + (depth - K) R) / depth at
most B (`budget_after_cuts`: R = B).

Two decodes. By default the kept set is fixed after the prefill, as in the official KV-cache code
(src/FastV/lmms-eval/fastv_kvcache.py L119-131, behind the README's lmms-eval table, and the Hugging
Face port with use_cache=True). The paper's accuracy runs (its K and R ablation; what the README calls
"the original fastv method") use the attention-mask mode (src/transformers/src/transformers/models/
llama/modeling_llama.py L763-808, run by inference_ocrvqa.py, whose output file is named "nocache"):
every pass ranks the image tokens by its last token's attention at layer K-1 and hides the others from
layer K on, so without a cache every generated token reruns the whole sequence and chooses again, for
every token. `rerank` runs that: slow (each token a full pass; the result's `cost` still counts the
prefill's FLOPs and the cache it would fill, and its kept set is the last pass's). The tokens are
removed rather than masked, which gives the same logits, since nothing reads a masked token. For a
one-token answer the two decodes agree.

Differs from the paper: the budget is, by default, the mean visual tokens per LLM layer, as the
papers that compare methods inside the LLM count FastV's rows (SparseVLMs issue #12: K = 2 keeping 144
counts as (2 * 576 + 30 * 144) / 32 = 171 tokens); the paper and its scripts give R, the count kept.
On a 32-layer LLM with K = 2, B = 192 of 576 keeps R = 166 tokens from layer 2 on, a mean of 191.6.
By default the kept set is fixed after the prefill, where the paper's accuracy runs choose again at
every generated token (`rerank`). The paper's text averages the attention of all tokens; its code,
and this file, use the last prompt token only. The official scripts give a system prompt one token
too long (--fast-v-sys-length 36 for 35 tokens, FastV issue #16), so their first image token is
always kept and the first text token is ranked with the image; here exactly the N visual tokens are
ranked. The official code ranks in fp16 with torch.topk; here in fp32, ties to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..core import LLM_ATTENTION, Cut, Method, Selection, Signals
from .common import budget_after_cuts, top


@dataclass(frozen=True)
class FastV(Method):
    layer: int = field(
        default=2, metadata={"help": "K: the first LLM layer that sees only the kept tokens", "range": (1, 100)}
    )
    keep_positions: bool = field(
        default=True, metadata={"help": "kept tokens keep their original positions (else they are renumbered)"}
    )
    budget_after_cuts: bool = budget_after_cuts()
    rerank: bool = field(
        default=False,
        metadata={
            "help": "slow: decode without a KV cache, each new token rerunning the whole sequence and choosing the "
            "image tokens again by its own attention (the paper's accuracy runs)"
        },
    )

    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = (LLM_ATTENTION,)
    summary: ClassVar[str] = (
        "FastV: before LLM layer K, keep the tokens the last prompt token attends to most (rerank: the paper's "
        "slow decode without a cache, choosing again at every token)"
    )

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        return [Cut(layer=self.layer, score_layer=self.layer - 1, tokens=budget)]

    def select(self, s: Signals) -> Selection:
        return by_last_token(s)


def by_last_token(s: Signals) -> Selection:
    """The tokens still in the sequence that the last prompt token attends to most, heads averaged."""
    scores = s[LLM_ATTENTION][:, -1].mean(0)  # (N,) NaN for tokens cut before
    keep = top(scores, s.alive.nonzero()[:, 0], s.budget)
    return Selection(keep=keep.sort().values, scores=scores)
