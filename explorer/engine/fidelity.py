"""How far a reduced model drifts from the full one on the full model's own answer.

Teacher forcing: the full run's answer A (T tokens) follows the prompt, once as the reduced run
builds it (only the kept visual tokens) and once as the full run does; one forward pass each gives
the next-token distribution at every answer position. We compare those: the mean log-probability
of A under each, the KL divergence from the full distribution to the reduced one at every token,
and the first token where the two models' greedy choices part. No sampling, no second generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..core import ExplorerError
from .llm import llm_hooks
from .pipeline import exclusive, media, method_for, select
from .video import Clip


def logprobs(
    backend, image: str | Image.Image | Clip, prompt: str, answer_ids, method="none", budget=1.0, settings=None
):
    """(T, V) float32 log-probabilities of the next token at each of the T answer positions, under
    the model as `method` at `budget` reduces it. An answer holding the prompt's image or video placeholder
    token (gibberish of random weights) cannot follow the prompt, where the model reads that token as a
    visual one: ExplorerError."""
    chosen, budget = method_for(backend, method, settings, budget)
    picture = media(image)
    with exclusive(backend):
        selected = select(backend, picture, prompt, chosen, budget, len(answer_ids))
        if backend.visual_token_id(selected.prepared) in list(answer_ids):
            raise ExplorerError(
                "the answer holds the visual placeholder token, so it cannot be scored after the prompt"
            )
        inputs = backend.generate_inputs(selected.prepared, selected.features, selected.selection.keep)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")  # (1, P)
        answer = torch.tensor([list(answer_ids)], dtype=ids.dtype, device=ids.device)  # (1, T)
        if "position_ids" in inputs:  # Qwen2-VL's M-RoPE: the answer goes on one position a token, as in generate()
            positions = inputs.pop("position_ids")  # (rows, 1, P)
            after = positions[..., -1:] + torch.arange(1, answer.shape[1] + 1, device=positions.device)  # (rows, 1, T)
            inputs["position_ids"] = torch.cat([positions, after], -1)
        # a method working inside the LLM cuts there (after its own step before the LLM, if it has one)
        stage, hooks = llm_hooks(backend, selected.prepared, method, chosen, selected.budget, selected.selection)
        with torch.inference_mode(), hooks:
            if stage is not None and stage.compacts:  # the answer is read on the caches cut after the prefill
                logits = _on_compacted_caches(backend, ids, mask, answer, inputs)
            elif chosen.rerank:  # every answer position has its own pass, which chooses again (slow)
                logits = _reranked(backend, ids, mask, answer, inputs)
            else:
                logits = backend.model(
                    input_ids=torch.cat([ids, answer], 1),
                    attention_mask=torch.cat([mask, torch.ones_like(answer)], 1),
                    **inputs,
                ).logits  # (1, P + T, V), fewer positions where visual tokens were cut inside the LLM
                logits = logits[:, -answer.shape[1] - 1 : -1]  # the logits at position i predict token i + 1
    return logits[0].float().log_softmax(-1).cpu()


def _on_compacted_caches(backend, ids, mask, answer, inputs) -> torch.Tensor:
    """(1, T, V) the logits of the prompt's last position and of the answer's but its last, for a method that cuts
    the KV caches after the prefill (MustDrop's decode stage): the answer cannot be read in the prompt's
    pass, since the layers it is cut from run before the last cut chooses, so the prompt goes first, with
    a cache, and the answer (but its last token) then reads the compacted caches in one more pass."""
    positions = inputs.pop("position_ids", None)  # (rows, 1, P + T) for Qwen2-VL
    length, count = ids.shape[1], answer.shape[1]
    prompt = {"position_ids": positions[..., :length]} if positions is not None else {}
    out = backend.model(input_ids=ids, attention_mask=mask, **inputs, **prompt, use_cache=True)
    if count == 1:
        return out.logits[:, -1:]
    rest = {"position_ids": positions[..., length : length + count - 1]} if positions is not None else {}
    after = backend.model(
        input_ids=answer[:, :-1],
        attention_mask=torch.cat([mask, torch.ones_like(answer[:, :-1])], 1),
        past_key_values=out.past_key_values,
        use_cache=True,
        **rest,
    )
    return torch.cat([out.logits[:, -1:], after.logits], 1)


def _reranked(backend, ids, mask, answer, inputs) -> torch.Tensor:
    """(1, T, V) the logits that predict each answer token, each from a pass without a cache over the prompt
    and the answer before it, as a method that chooses again at every token (`rerank`) decodes."""
    positions = inputs.pop("position_ids", None)  # (rows, 1, P + T) for Qwen2-VL
    steps = []
    for t in range(answer.shape[1]):
        length = ids.shape[1] + t
        extra = {"position_ids": positions[..., :length]} if positions is not None else {}
        out = backend.model(
            input_ids=torch.cat([ids, answer[:, :t]], 1),
            attention_mask=torch.cat([mask, torch.ones_like(answer[:, :t])], 1),
            use_cache=False,
            **inputs,
            **extra,
        )
        steps.append(out.logits[:, -1:])
    return torch.cat(steps, 1)


def drift(reduced: torch.Tensor, full: torch.Tensor, answer_ids) -> dict:
    """Compare the (T, V) log-probabilities of the reduced and the full model on the answer."""
    answer = torch.tensor(list(answer_ids))[:, None]  # (T, 1)
    mine, theirs = reduced.gather(1, answer)[:, 0], full.gather(1, answer)[:, 0]  # (T,) each
    kl = F.kl_div(reduced, full, log_target=True, reduction="none").sum(-1)  # (T,) KL(full || reduced)
    parted = (reduced.argmax(-1) != full.argmax(-1)).nonzero()[:, 0]
    return {
        "logprob": mine.mean().item(),  # mean log-probability per answer token, reduced model
        "full_logprob": theirs.mean().item(),  # the same under the full model
        "logprob_diff": (mine - theirs).mean().item(),
        "kl": kl.mean().item(),
        "first_divergence": int(parted[0]) if len(parted) else None,  # answer token index, None if never
        "per_token": {"logprob": mine.tolist(), "full_logprob": theirs.tolist(), "kl": kl.tolist()},
    }
