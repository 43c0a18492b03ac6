"""Teaching views: what a method saw, step by step, and the [CLS] attention of every vision layer."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from backends.signals import CLS_HEADS, at

from ..core import ExplorerError, Geometry
from ..engine.images import load_image
from ..methods import METHODS
from . import visual as vis

# what each intermediate map shows, in plain words; a map not here gets a generic caption
CAPTIONS = {
    "content": "HiRED, step 1: the [CLS] token's attention to the thumbnail in the first vision layer. "
    "Early layers attend to where there is something to see, so this map says where the content is.",
    "content top": "HiRED, step 2: the thumbnail tokens with the most layer-0 attention. Counting how many "
    "fall inside each crop gives that crop's content score, and so its share of the budget.",
    "contextual": "VisionZip: after the dominant tokens (top [CLS] attention), a few contextual tokens are "
    "spread over the rest; every other token is merged into the contextual token whose key it resembles most.",
    "crop score": "GlobalCom2: each crop token's own attention plus the thumbnail's attention at the same "
    "place; the crop keeps its top tokens by this score.",
    "thumbnail guide": "GlobalCom2: the thumbnail's attention, summed over each crop's region, sets how many "
    "tokens that crop keeps: crops the thumbnail looks at keep more.",
    "picked early": "DivPrune: the order in which tokens were picked; each new pick is the token farthest "
    "from everything picked so far, so the kept set covers the image's variety.",
    "distance to kept": "DivPrune: how far each token is from its nearest kept token at the end.",
    "key norm": "DART: the L1 norm of each visual token's key in the LLM layer before the cut; the largest "
    "are the pivots, and the tokens kept are those least like the pivots.",
    "merge round": "ToMe: the round of bipartite matching in which each token was merged into a more alike "
    "partner (0: it was kept, and holds the tokens merged into it); early rounds merge the closest pairs.",
    "merged after block": "ToMe in the vision tower: the encoder block after which each patch was merged into "
    "a more alike one (blank: it reached the LLM, holding the patches merged into it); every block merges a "
    "few, so each later block runs on fewer tokens. The patches are dealt alternately to the two sides of the "
    "matching, so in one block every other one (on a grid: every other column) can be merged away.",
    "window similarity": "MustDrop, before the LLM: how alike the tokens of each 3x3 window are (mean cosine "
    "similarity of every pair, first vision layer); a window at least this alike becomes one token.",
    "key set": "MustDrop: the key set (bright), the tokens the [CLS] token attends to most in the last vision "
    "layer; no later stage may drop them.",
    "text attention share": "MustDrop, inside the LLM: each visual token's share of all the attention the prompt's "
    "text gives the image at the last pruning layer; a token goes only when this and its peak are both low.",
    "merged before the LLM": "AIM, before the LLM: the round of bipartite matching on the projected tokens in "
    "which each token was merged into a more alike partner (0: it reached the LLM, holding those merged into it).",
    "TTV share": "TransPrune: how much the LLM's layers before the cut transformed each visual token (token "
    "transition variation), as a share of the image's total; added to the prompt's attention share to rank.",
    "IGA share": "TransPrune: the prompt's attention to each visual token at the cut layer, heads and text "
    "tokens averaged, as a share of the image's total; added to the transition share to rank.",
    "similarity to reference": "DyCoke, before the LLM: how alike each token is to the token at the same place "
    "in its reference frame (the first of its pair, or of its window of 4 frames); a compared frame keeps only its "
    "least alike tokens, since the rest repeat what the reference already shows. Whole frames are blank.",
    "reference frame": "DyCoke: the frame each token was compared with; blank for the frames kept whole. Inside "
    "the LLM, each decode step then attends only to the visual tokens its attention ranks highest.",
    "diverse": "VisPruner: after the important half, the remaining tokens are chosen by removing "
    "near-duplicates round by round, so the second half covers what the first missed.",
    "DySeg segment": "FastVID, step 1: the segment of alike consecutive frames each token's frame belongs to; "
    "the clip is cut where neighbouring frames differ most (and wherever they are less alike than tau), so a "
    "segment shows one scene, and its tokens are merged across its frames.",
    "density score": "FastVID, step 3: the density score of each anchor frame's tokens that were not kept "
    "for their attention (its distance to the nearest denser token times its density); the highest become "
    "anchors, and every other token of the segment is merged into the anchor it resembles most.",
    "HoliTom window": "HoliTom, step 1: the window of frames each token belongs to; the windows are chosen "
    "together, by dynamic programming, to merge away as many tokens that stay the same over time as possible.",
    "static token": "HoliTom, step 2: the tokens that stay alike at their place over their whole window (1), "
    "merged into one token each over time, and the dynamic ones (0), which keep their most attended tokens.",
    "prompt-frame similarity": "Free Video-LLM, step 1: how alike each frame is to the prompt, as a CLIP model "
    "beside the VLM sees them (cosine of its text and image embeddings), one value a frame. The frames most like "
    "the prompt keep their regions first; the budget decides how many do, so at a low one only the best few stay.",
    "prompt region": "Free Video-LLM, step 2: in each chosen frame, the box (bright) about the mean place of the "
    "patches most like the prompt, covering roi_ratio of the frame; only tokens inside it reach the LLM. Dark: "
    "chosen frames' tokens outside their box, and frames not reached.",
    "frame uniqueness": "VidCom2, step 1: how unlike the clip's average token each frame's tokens are, one value "
    "a frame. A softmax over the frames turns it into budget shares, so a frame unlike the rest of the clip (a "
    "cut, something new) keeps more tokens; within each frame, the tokens least like the clip and the frame stay.",
    "change from previous frame": "EVS: how much each token changed from the token at the same place one frame "
    "before (1 - cosine similarity; blank on the first frame, which is kept whole). Static background barely "
    "changes, so across the whole clip the budget goes to what moves.",
}


def steps(picture: Image.Image, result) -> list[tuple[Image.Image, str]]:
    """The run's stages drawn on the image, each with a caption: the method's intermediate maps,
    where its budget went, the scores it ranked by, its merge groups and what reached the LLM."""
    g, selection, method = result.geometry, result.selection, METHODS[result.method]
    if not method.budgeted:
        return [(picture, "No reduction: every visual token reaches the LLM, so there are no steps to show.")]
    views = vis.views(g)
    shown = []
    for name, values in selection.maps.items():
        caption = CAPTIONS.get(name, f"{result.method}: its intermediate map “{name}”.")
        shown += [
            (vis.heatmap(picture, g, values, tokens), f"{caption} ({view})") for view, tokens in _having(views, values)
        ]
    if selection.budgets:
        shown.append((budgets(picture, g, selection), _budget_caption(result)))
    if selection.scores is not None:
        caption = f"{result.method}: the score it ranks tokens by (brighter is higher); the top ones are kept"
        shown += [
            (vis.heatmap(picture, g, selection.scores, t), f"{caption} ({v}).")
            for v, t in _having(views, selection.scores)
        ]
    else:
        shown.append((picture, f"{result.method} has no per-token score to show: it does not rank tokens."))
    if selection.groups is not None:
        caption = "Merge groups: each dropped token tinted with the colour of the kept token it was merged into"
        shown += [(vis.overlay(picture, g, selection, t), f"{caption} ({v}).") for v, t in views.items()]
    cuts = result.tokens.get("llm_cuts")
    where = f"What reaches the LLM's layers from layer {cuts[-1]['layer']} on" if cuts else "What reaches the LLM"
    kept = f"{where}: {result.tokens['visual_kept']} of {result.tokens['visual_full']} visual tokens"
    if cuts:
        kept += f" ({result.tokens['visual_layer_mean']:.0f} per LLM layer on average, the budget's count)"
    seen, cached = result.tokens.get("visual_per_layer", []), result.tokens.get("visual_cached_per_layer", [])
    compacted = [layer for layer, (s, c) in enumerate(zip(seen, cached)) if c < s]  # MustDrop's decode stage
    if compacted:
        kept += f", and while decoding, the KV caches from layer {compacted[0]} on hold only these"
    shown += [
        (vis.overlay(picture, g, selection, t), f"{kept}; dropped patches greyed and hatched ({v}).")
        for v, t in views.items()
    ]
    reference = " ".join(vis.explain(result.method).split("\n\n")[1].split())  # the paper, from the method's file
    image, caption = shown[0]
    return [(image, f"{caption} Paper: {reference}"), *shown[1:]]


def _having(views: dict, values: torch.Tensor):
    """The views in which some token has a value."""
    return [(view, tokens) for view, tokens in views.items() if not values[tokens].isnan().all()]


def budgets(picture: Image.Image, g: Geometry, selection) -> Image.Image:
    """The image with every crop's region outlined and labelled with its budget of its tokens."""
    canvas = picture.convert("RGB").resize(vis.display_size(g))
    draw = ImageDraw.Draw(canvas)
    scale = canvas.width / g.image_size[0]
    sizes = g.sizes()
    for p, name in enumerate(g.names):
        box = g.boxes[g.partition == p]
        if p == g.thumbnail or name == "newline" or not len(box) or torch.isnan(box).all():
            continue
        x0, y0 = (box[:, :2].amin(0) * scale).tolist()
        x1, y1 = (box[:, 2:].amax(0) * scale).tolist()
        draw.rectangle([x0 + 1, y0 + 1, x1 - 2, y1 - 2], outline=vis.KEPT, width=3)
        label = f"{name}: {selection.budgets.get(name, 0)} of {sizes[p]}"
        draw.text((x0 + 6, y0 + 6), label, fill="white", stroke_width=2, stroke_fill="black")
    return canvas


def _budget_caption(result) -> str:
    budgets = result.selection.budgets
    text = "Where the budget went: " + ", ".join(f"{k} {v}" for k, v in budgets.items()) + "."
    for stat, values in result.selection.stats.items():
        text += f" {stat}: " + ", ".join(f"{k} {v:g}" for k, v in values.items()) + "."
    return text


def layer_maps(backend, image, prompt: str = "Describe the image.") -> tuple[Geometry, torch.Tensor]:
    """The [CLS] attention of every vision layer, per head: (L, N, heads) float32 on the CPU, in LLM
    order, NaN for tokens without a patch (newlines). One pass of the vision encoder."""
    prepared = backend.prepare(load_image(image), prompt)
    layers = backend.vision_layers
    with torch.inference_mode():
        names = [at(CLS_HEADS, layer) for layer in range(layers)]
        _, signals = backend.encode(prepared, tuple(names))
    return prepared.geometry, torch.stack([signals[name].float().cpu() for name in names])


def layer_picture(picture, g: Geometry, maps: torch.Tensor, layer: int, head: int | None, tokens) -> Image.Image:
    """One layer's [CLS] attention, one head or all heads summed, as a heatmap over `tokens`."""
    if not 0 <= layer < len(maps) or (head is not None and not 0 <= head < maps.shape[2]):
        raise ExplorerError(f"layer must be 0..{len(maps) - 1} and head 0..{maps.shape[2] - 1}")
    values = maps[layer].sum(1) if head is None else maps[layer, :, head]  # (N,)
    return vis.heatmap(picture, g, values, tokens)


def profile(maps: torch.Tensor, token: int, head: int | None, heads: str = "heads summed"):
    """A plotly line of a token's [CLS] attention in every layer (heads summed, or one head)."""
    import plotly.graph_objects as go

    values = (maps[:, token].sum(1) if head is None else maps[:, token, head]).tolist()
    figure = go.Figure(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers"))
    figure.update_layout(
        xaxis_title="vision layer",
        yaxis_title=f"[CLS] attention ({heads})",
        height=300,
        margin=dict(l=60, r=20, t=20, b=40),
    )
    return figure


# the video mode's lesson (ui/video.py)
TEMPORAL = """**Temporal redundancy.** Neighbouring frames of a video mostly show the same things: a still
background, an object that moved a little. Their visual tokens repeat each other, so a clip can lose many of
them at little cost. The baselines use it in different ways: **frames** keeps whole frames, evenly spaced, and
drops the others outright (sampling fewer frames at the same token budget); **uniform** keeps every frame but
an evenly spaced grid of patches in each; **random** keeps a random share of every frame. Image methods run on
each frame with its share of the budget; video methods (`frames`, ...) read the whole clip. Under the frame strip,
a video method's steps on your clip: the segments (or windows) of frames it treats together as coloured bands,
each frame's budget, what it did, and which merged tokens span several frames."""
