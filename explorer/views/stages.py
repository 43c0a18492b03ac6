"""Where a run's time goes: its measured stages (preprocessing, vision encoder, selection, LLM prefill,
decode) as one stacked bar per run, and a sentence on what a method before the LLM can and cannot save
on this model.

The stages come from `Result.timing`: preprocessing, the vision stage (the encoder, the attention maps a
method's signals recompute inside it, the projector) and the selection are timed on their own; the LLM
prefill is what remains of the time to first token (the prefill and the glue around it: building the
prompt's embeddings, the first token's sampling); decode is the rest of the run. The attention maps'
share of the vision stage is not timed apart (the encoder's hooks compute them between its layers): the
sentence gives their computed share of the vision FLOPs instead, labelled computed.
"""

from __future__ import annotations

import html

from . import style

STAGES = ("preprocessing", "vision encoder", "selection", "LLM prefill", "decode")


def split(timing: dict) -> dict[str, float]:
    """Seconds per stage of one run (`STAGES`), from its `Result.timing`; they add up to its total."""
    before = timing["preprocess_s"] + timing["vision_s"] + timing["selection_s"]
    ttft = timing["ttft_s"] if timing["ttft_s"] is not None else before  # no token generated: no LLM time
    return {
        "preprocessing": timing["preprocess_s"],
        "vision encoder": timing["vision_s"],
        "selection": timing["selection_s"],
        "LLM prefill": max(0.0, ttft - before),
        "decode": max(0.0, timing["total_s"] - ttft),
    }


def svg(runs: dict[str, dict], width: int = 640) -> str:
    """An SVG of one horizontal stacked bar per run (label -> its `Result.timing`), on one time axis, with
    the seconds of each stage wide enough to hold them and a key of the stages."""
    parts = {label: split(timing) for label, timing in runs.items()}
    longest = max(sum(p.values()) for p in parts.values()) or 1.0
    left, bar, gap = 70, 22, 8
    scale = (width - left - 60) / longest
    shapes = []
    for row, (label, seconds) in enumerate(parts.items()):
        y, x = row * (bar + gap), float(left)
        shapes.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>')
        for stage, value in seconds.items():
            w = value * scale
            tip = f"{stage}: {value:.3f} s"
            shapes.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{style.css(style.STAGE[stage])}">'
                f"<title>{html.escape(tip)}</title></rect>"
            )
            if w > 44:
                shapes.append(f'<text x="{x + 4:.1f}" y="{y + 15}" fill="#fff">{value:.2f}s</text>')
            x += w
        shapes.append(f'<text x="{x + 4:.1f}" y="{y + 15}">{sum(seconds.values()):.2f} s</text>')
    y = len(parts) * (bar + gap) + 4
    x = left
    for stage in STAGES:  # the key
        shapes.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{style.css(style.STAGE[stage])}"/>')
        shapes.append(f'<text x="{x + 14}" y="{y + 9}">{stage}</text>')
        x += 14 + 7 * len(stage) + 14
    height = y + 16
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="stages" viewBox="0 0 {width} {height}" '
        f'width="100%" style="max-width:{width}px" font-family="sans-serif" font-size="11" role="img" '
        f'aria-label="where the time goes">{"".join(shapes)}</svg>'
    )


def sentence(result, full=None) -> str:
    """Where this model spends its time, from the unreduced run when there is one (else this run), what a
    method before the LLM can save there, and, computed, the recomputed attention maps' share of the vision
    stage and the real architecture's split when the model is a small stand-in."""
    base = full if full is not None else result
    seconds = split(base.timing)
    ttft = sum(v for k, v in seconds.items() if k != "decode") or 1.0
    vision, llm = seconds["vision encoder"] / ttft, seconds["LLM prefill"] / ttft
    which = "the unreduced run" if full is not None else "this run"
    words = [
        f"On {base.model}, {which} spends {vision:.0%} of its time to first token in the vision encoder and "
        f"{llm:.0%} in the LLM's prefill. A method that acts before the LLM shortens only the prefill and the "
        "decode: the encoder still runs on every patch, whatever the budget (only tome-vit, which merges "
        "inside the encoder, saves there)."
    ]
    parts = result.cost.get("vision_flops_parts") or {}
    if parts.get("attention_maps"):
        share = parts["attention_maps"] / result.cost["vision_flops"]
        words.append(
            f"This method's signals recompute attention maps inside the encoder: {share:.0%} of the vision "
            "stage's FLOPs (computed), part of the vision encoder's time here."
        )
    projected = result.cost.get("projected")
    if projected:
        real = projected["full"]
        ratio = real["prefill_flops"] / max(real["vision_flops"], 1)
        words.append(
            f"At real size ({projected['model']}, computed) the unreduced LLM prefill does {ratio:.1f}x the "
            "vision stage's work, so the times above are this small model's proportions, not the real one's."
        )
    return " ".join(words)


def html_of(result, full=None) -> str:
    """The bars of a run (and of the full run, when there is one) and the sentence under them, as HTML."""
    runs = {"reduced": result.timing} | ({"full": full.timing} if full is not None else {})
    return f"{svg(runs)}<p class='stages-note'>{html.escape(sentence(result, full))}</p>"
