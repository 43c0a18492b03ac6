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
Face port with use_cache=True). The paper's accuracy numbers (its K and R ablation, the README's
"original fastv method") come from the attention-mask mode without a KV cache
(src/transformers/src/transformers/models/llama/modeling_llama.py L763-808, run by
inference_ocrvqa.py, whose output file is
named "nocache"): every generated token reruns the whole sequence, ranks the image tokens by its own
attention at layer K-1 and hides the others from layer K on, from every token. `rerank` runs that
mode: slow (no cache, each token a full pass); the tokens are removed rather than masked, which gives
the same logits (the masked tokens are read by no one). For a one-token answer the two agree.

Differs from the paper: the budget is, by default, the mean visual tokens per LLM layer, as DART's
and PyramidDrop's papers configure FastV for their "retain 192 tokens" rows; the paper and its
scripts give R, the count kept: on a 32-layer LLM with K = 2, B = 192 of 576 keeps R = 166 tokens
from layer 2 on, a mean of 191.6. The paper's text averages the attention of all tokens; its code,
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
