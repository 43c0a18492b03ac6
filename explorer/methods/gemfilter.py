"""GemFilter (Shi, Ming, Nguyen, Liang and Joty, "Discovering the Gems in Early Layers: Accelerating
Long-Context LLMs with 1000x Input Token Reduction", arXiv 2409.17422,
github.com/SalesforceAIResearch/GemFilter).

Two passes. The first runs the LLM on the whole prompt only up to an early filter layer, where the
last prompt token's query meets every prompt token's key (after RoPE): the raw products q.k, summed
over the heads and averaged over a window of 5 neighbouring tokens along the prompt, score the
tokens (my_baseline/GemFilter/gem_filter_utils.py L6-34). The B visual tokens with the highest scores
are kept with every text token, and the second pass runs the whole prefill again, from layer 0, on
that shorter prompt alone, its positions numbered afresh (my_utils/my_generation.py L72-90); the
answer is decoded from it. The first pass is this method's own work: it is timed in `selection_s`
(and so in the time to first token), and its FLOPs (`cost.first_pass_flops`: the layers below the
filter layer on the whole prompt, and that layer's keys and last query) are added to the computed
prefill FLOPs, beside those of the second pass, the prefill the answer is decoded from (the cost's
`first_pass_flops` gives them apart). Every layer of that prefill sees the B kept tokens, so B is also
the mean visual tokens per LLM layer.

The filter layer is numbered as in a 32-layer LLM and scaled to the model's depth: layer l becomes
the nearest whole layer to l depth / 32 (0-based, as in the code). The paper filters at layer 13 of
LLaMA-3.1-8B-Instruct's 32 (the default here: 13 on 32 layers, 10 on 24, 11 on 28) and at 19 of
Mistral-Nemo-Instruct's 40, which `layer` = 15 gives (needle_eval.py L28-31).

Differs from the paper: the paper ranks every prompt token, text included, and keeps the top 1024;
here the budget counts only visual tokens and the text is always kept (the average over 5 tokens
still runs over the whole prompt, text included, with zeros past its ends as in the code). The
second pass feeds the kept tokens' input embeddings (the code re-reads the kept token ids); on
Qwen2-VL the kept visual tokens keep the M-RoPE positions of the full prompt, as for every method
before the LLM there, where the code renumbers. The code scores in fp16 and ranks with torch.topk;
here in fp32, ties to the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core import FEATURES, LLM_LOGITS, LLM_POSITIONS, Method, Selection, Signals
from .common import top

POOL = 5  # the tokens averaged around each score (gem_filter_utils.py L6, kernel_size=5)


@dataclass(frozen=True)
class GemFilter(Method):
    layer: int = field(
        default=13, metadata={"help": "the filter layer, numbered as in a 32-layer LLM", "range": (0, 200)}
    )

    needs: ClassVar[tuple[str, ...]] = (FEATURES,)  # every visual token projected, for the first pass
    summary: ClassVar[str] = (
        "GemFilter: a first pass to LLM layer 13 (of 32) ranks the visual tokens by the last prompt token's "
        "q.k; the whole prefill reruns on the kept ones"
    )

    def early_layer(self, depth: int) -> int:
        return min(depth - 1, math.floor(self.layer * depth / 32 + 0.5))

    def select(self, s: Signals) -> Selection:
        logits = s[LLM_LOGITS].float().sum(0)  # (L,) heads summed
        pooled = F.avg_pool1d(logits[None, None], POOL, stride=1, padding=POOL // 2)[0, 0]  # (L,) zeros past the ends
        scores = pooled[s[LLM_POSITIONS].to(pooled.device)].cpu()  # (N,)
        keep = top(scores, torch.arange(len(scores)), s.budget)
        return Selection(keep=keep.sort().values, scores=scores)
