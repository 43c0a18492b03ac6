"""The vision-stage methods against their official code: HiRED, VisionZip, VisPruner and DivPrune with
`paper_code=True` keep exactly the tokens the official code keeps, on the same signals of the tiny
LLaVA-NeXT, for a square image, a 4:3 image (a 2x2 grid with padding above and below) and a wide one
(a 1x3 grid), at two budgets each.

Each reference below is our own reading of the official repository at the commit named, with the
file and lines it follows; none is a copy. Where the official code feeds the LLM tokens that
llava-hf's LLM cannot receive (positions on padding, each crop's [CLS]), the test compares the
official picks that are real tokens; where it feeds real tokens only, the test compares exactly
what it feeds, in its order.
"""

import pytest
import torch
from conftest import photo
from transformers.image_processing_utils import select_best_resolution

from explorer import Budget, ExplorerError, Signals, make, run
from explorer.core import CLS_0, CLS_FEATURE, FEATURES, HIDDEN_FEATURE, KEYS_FEATURE, ROWS, padded

PROMPT = "What is shown in this image?"
IMAGES = {"square": (600, 600), "4:3": (640, 480), "wide": (1000, 300)}  # (width, height) -> 2x2, 2x2, 1x3
G = 24  # tokens per crop side; T = G * G = 576 positions per crop
NEEDS = (CLS_0, CLS_FEATURE, KEYS_FEATURE, HIDDEN_FEATURE, FEATURES, ROWS)
NEEDS += tuple(padded(name) for name in (CLS_FEATURE, KEYS_FEATURE, HIDDEN_FEATURE))


@pytest.fixture(scope="module", params=list(IMAGES))
def image(request, backend):
    """(name, prepared, signals, (rows, cols) of the crop grid) of one image, encoded once."""
    width, height = IMAGES[request.param]
    prepared = backend.prepare(photo(width, height, seed=5), PROMPT)
    with torch.no_grad():
        _, maps = backend.encode(prepared, NEEDS)
    best = select_best_resolution((height, width), backend.model.config.image_grid_pinpoints)
    return request.param, prepared, attended_padding(maps, prepared.source), (best[0] // 336, best[1] // 336)


def attended_padding(maps: dict, source: torch.Tensor) -> dict:
    """The random tiny model pays the uniform padding little [CLS] attention, where CLIP-L often pays
    uniform regions much; here every padded position gets an attention drawn between its crop's
    lowest and highest, so that the official code picks some padding."""
    scores = maps[padded(CLS_FEATURE)].clone()  # (P, T)
    real = torch.zeros(scores.numel(), dtype=torch.bool)
    real[source[source >= 0]] = True
    real = real.view(scores.shape)
    generator = torch.Generator().manual_seed(0)
    for c, crop in enumerate(scores):
        low, high = crop[real[c]].min(), crop[real[c]].max()
        drawn = torch.rand(int((~real[c]).sum()), generator=generator)
        crop[~real[c]] = low + (high - low) * drawn
    return maps | {padded(CLS_FEATURE): scores}


def kept_rows(prepared, selection) -> list[int]:
    """The encoder rows (crop * 576 + position) of the kept tokens, in LLM order."""
    return prepared.source[selection.keep].tolist()


def picked_rows(masks: torch.Tensor) -> set[int]:
    """The encoder rows of the official picks, (P, T) bool."""
    return set(masks.flatten().nonzero()[:, 0].tolist())


def real_rows(prepared) -> set[int]:
    return set(prepared.source[prepared.source >= 0].tolist())


def stitched(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows * G, cols * G): the crops' (rows * cols, G, G) values laid out as the image, as LLaVA's
    `view(h, w, 24, 24).permute(0, 2, 1, 3)` does."""
    return values.view(rows, cols, G, G).permute(0, 2, 1, 3).reshape(rows * G, cols * G)


def encoder_rows(crops: int) -> torch.Tensor:
    """(P, G, G): each position's row in the flat encoder output."""
    return torch.arange(crops * G * G).view(crops, G, G)


# --- HiRED: hasanar1f/HiRED 502d6dd, transformers/src/transformers/models/llava_next/modeling_llava_next.py


def hired_picks(top: torch.Tensor, bottom: torch.Tensor, total: int, alpha: float) -> torch.Tensor:
    """(P, T) bool, HiRED_token_selection (L518-559) with HiRED_sub_img_budgets (L490-516): `top` the
    thumbnail's layer-0 [CLS] attention (T,), `bottom` every crop's feature-layer [CLS] attention (P, T),
    heads summed (L534-535), crop 0 the thumbnail."""
    crops, t = bottom.shape
    masks = torch.zeros(crops, t, dtype=torch.bool)
    thumbnail = min(int(total * alpha), t)  # L539
    rest = min(total - thumbnail, (crops - 1) * t)  # L540
    masks[0, bottom[0].topk(thumbnail).indices] = True  # L547
    if rest > 0:
        content = torch.zeros(t, dtype=torch.bool)
        content[top.topk(int(t * (1 - alpha))).indices] = True  # L550
        # L508-510: reshape(h, w, -1).sum(-1): equal runs of the raster order, one per crop
        counts = content.reshape(crops - 1, -1).sum(-1)
        shares = ((counts / counts.sum()) * rest).int().clamp(max=t)  # L513-516: truncated, remainders lost
        for i, k in enumerate(shares.tolist()):
            masks[i + 1, bottom[i + 1].topk(k).indices] = True  # L555-556: all 576 positions, padding included
    return masks


def fork_unpad(grid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """unpad_image of HiRED's transformers fork (L167-207) on a 2-D grid; `image_size` (height, width)."""
    height, width = image_size
    h, w = grid.shape
    if width / height > w / h:
        padding = (h - int(height * (w / width))) // 2
        return grid[padding : h - padding]
    padding = (w - int(width * (h / height))) // 2
    return grid[:, padding : w - padding]


def hired_fed(masks: torch.Tensor, image_size: tuple[int, int], rows: int, cols: int) -> list[int]:
    """The encoder rows the official code feeds the LLM, in its order (pack_HiRED_image_features,
    L782-860; image_newline=None at L1011): the thumbnail's picks, then the crops' picks in the raster
    order of the unpadded stitched grid. L816 unpacks get_anyres_image_grid_shape's (rows, cols) as
    (num_patch_width, num_patch_height) and L821-822 view the crops as (num_patch_height,
    num_patch_width), so a grid of unequal sides is laid out transposed."""
    at = encoder_rows(len(masks))
    layout = stitched(at[1:], cols, rows)  # (num_patch_height, num_patch_width) = (cols, rows)
    fed = fork_unpad(layout, image_size).flatten()
    return at[0].flatten()[masks[0]].tolist() + [r for r in fed.tolist() if masks.flatten()[r]]


@pytest.mark.parametrize("rate", [0.2, 0.1])
def test_hired_paper_code_keeps_what_the_official_code_keeps(image, rate):
    name, prepared, maps, (rows, cols) = image
    g, crops = prepared.geometry, 1 + rows * cols
    total = int(crops * 576 * rate)  # L538: the official budget, padding counted, newlines not
    base = g.members(g.thumbnail)
    masks = hired_picks(maps[CLS_0][base], maps[padded(CLS_FEATURE)], total, 0.5)
    selection = make("hired", paper_code=True).select(Signals(g, total, maps))
    kept = kept_rows(prepared, selection)
    width, height = IMAGES[name]
    if rows == cols:  # the official layout is right: what it feeds, in its order
        assert kept == hired_fed(masks, (height, width), rows, cols)
    else:  # laid out transposed, it unpads a band of the wrong positions: compare its picks on real tokens
        assert set(kept) == picked_rows(masks) & real_rows(prepared)
        fed = {r for r in hired_fed(masks, (height, width), rows, cols) if r >= 576}  # the crops' part
        assert fed < set(kept) and {r // 576 for r in fed} == {2}  # a band of the middle crop's picks alone
    padding = picked_rows(masks) - real_rows(prepared)
    assert sum(selection.stats["padding picked"].values()) == len(padding) == masks.sum() - len(kept)
    assert (len(padding) > 0) == (name != "square")  # the test sees padding picked where there is padding
    budgets = [selection.budgets[n] for n in g.names[:crops]]
    assert budgets == masks.sum(1).tolist() and sum(budgets) <= total


def test_hired_on_llava_1_5_is_the_official_top_k_by_feature_layer_cls_attention():
    """modeling_llava.py L340-354: the top int(576 * rate) by layer-22 [CLS] attention, alpha unused."""
    from explorer.core import Geometry

    g = Geometry(("image",), torch.zeros(576, dtype=torch.long), torch.zeros(576, 2), torch.zeros(576, 4), (1, 1))
    scores = torch.rand(576, generator=torch.Generator().manual_seed(0))
    for alpha in (0.5, 0.1):
        signals = Signals(g, int(576 * 0.2), {CLS_FEATURE: scores, CLS_0: scores})
        selection = make("hired", alpha=alpha).select(signals)
        assert selection.keep.tolist() == scores.topk(115).indices.sort().values.tolist()
        assert torch.equal(selection.keep, make("cls").select(signals).keep)  # the same as FasterVLM there


# --- VisionZip: dvlab-research/VisionZip 3151f6d, visionzip/clip_encoder.py and visionzip/llava_arch.py


def visionzip_picks(cls: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """Per crop, clip_encoder.py L49-80: (P, T) bool dominant patches, (P, T) bool targets, and (P, T)
    long the target position each other patch joins (-1 for dominant patches and targets). `cls` (P, T)
    the feature layer's [CLS] attention heads summed (L51-52); `keys` (P, T, heads, d) its keys, whose
    head mean is the code's `metric` (utils.py L89). Positions are encoder rows (crop * T + position)."""
    crops, t = cls.shape
    dominants = torch.zeros(crops, t, dtype=torch.bool)
    targets = torch.zeros(crops, t, dtype=torch.bool)
    joins = torch.full((crops, t), -1)
    for c in range(crops):
        dominants[c, cls[c].topk(dominant - 1).indices] = True  # L53: [CLS] is the D-th (main.py L7)
        rest = (~dominants[c]).nonzero()[:, 0]  # L59-62: the others in ascending order
        metric = keys[c].mean(1)[rest]
        metric = metric / metric.norm(dim=-1, keepdim=True)  # L64
        step = max(1, len(rest) // contextual)  # L67
        chosen = torch.arange(0, len(rest), step)[:contextual]  # L68
        merging = ~torch.isin(torch.arange(len(rest)), chosen)
        similarity = metric[merging] @ metric[chosen].T  # L70-72
        targets[c, rest[chosen]] = True
        joins[c, rest[merging]] = c * t + rest[chosen][similarity.argmax(1)]  # L73-74
    return dominants, targets, joins


@pytest.mark.parametrize("per_crop", [64, 128])
def test_visionzip_paper_code_keeps_what_the_official_code_keeps(image, per_crop):
    name, prepared, maps, (rows, cols) = image
    g, crops = prepared.geometry, 1 + rows * cols
    contextual = per_crop * 10 // 64  # the paper's 54 + 10, 108 + 20
    dominants, targets, joins = visionzip_picks(
        maps[padded(CLS_FEATURE)], maps[padded(KEYS_FEATURE)], per_crop - contextual, contextual
    )
    selection = make("visionzip", paper_code=True).select(Signals(g, per_crop * crops, maps))
    source, real = prepared.source, real_rows(prepared)
    # the code feeds each crop's [CLS], dominant patches and targets, padding included (llava_arch.py L42-80)
    assert set(kept_rows(prepared, selection)) == picked_rows(dominants | targets) & real
    token = {int(r): i for i, r in enumerate(source.tolist()) if r >= 0}
    for r, into in enumerate(joins.flatten().tolist()):  # every real patch merged into a real target
        if into >= 0 and r in real:
            assert int(selection.groups[token[r]]) == token.get(into, -1)
    lost = sum(selection.stats["padding picked"].values())
    assert lost == len(picked_rows(dominants | targets) - real) and (lost > 0) == (name != "square")
    if name == "square":  # nothing on padding: each target carries itself + the mean of what joined it (L75-80)
        weights = selection.weights.to_dense()
        for i, t in enumerate(selection.keep.tolist()):
            joined = (joins.flatten() == source[t]).nonzero()[:, 0]
            expected = torch.zeros(len(g))
            expected[[token[int(r)] for r in joined]] = 1 / max(len(joined), 1)
            expected[t] = 1.0
            torch.testing.assert_close(weights[i], expected)


# --- VisPruner: Theia-4869/VisPruner aefa01a, llava/model/llava_arch.py


def vispruner_picks(cls: torch.Tensor, hidden: torch.Tensor, per_crop: int, ratio: float) -> torch.Tensor:
    """(P, T) bool, encode_images (L141-186) on every crop: `cls` (P, T) the feature layer's [CLS]
    attention (its head mean at L154 ranks as our head sum), `hidden` (P, T, C) its outputs."""
    crops, t = cls.shape
    masks = torch.zeros(crops, t, dtype=torch.bool)
    important_n = int(per_crop * ratio)  # L150
    diverse_n = per_crop - important_n
    x = hidden / hidden.norm(dim=-1, keepdim=True)  # L160
    for c in range(crops):
        order = cls[c].argsort(descending=True)  # L155
        important, residual = order[:important_n], order[important_n:]
        while diverse_n > 0:  # L161-177
            r = min(8, len(residual) - diverse_n)
            if r <= 0:
                break
            a, b = residual[::2], residual[1::2]
            scores = (x[c, a] @ x[c, b].T).max(-1).values
            residual = torch.cat([a[scores.argsort(descending=True)[r:]], b])
        masks[c, torch.cat([important, residual]) if diverse_n > 0 else important] = True  # L179-184
    return masks


def vispruner_fed(masks: torch.Tensor, rows: int, cols: int) -> list[int]:
    """What the official code feeds the LLM on LLaVA-NeXT: L207 strips "_unpad", so L245-251 run: the
    thumbnail's picks, then the crops' on the stitched padded grid in raster order, no newline."""
    at = encoder_rows(len(masks))
    grid, picked = stitched(at[1:], rows, cols).flatten(), stitched(masks[1:], rows, cols).flatten()
    return at[0].flatten()[masks[0]].tolist() + grid[picked].tolist()


@pytest.mark.parametrize("per_crop", [32, 64])
def test_vispruner_paper_code_keeps_what_the_official_code_keeps(image, per_crop):
    name, prepared, maps, (rows, cols) = image
    g, crops = prepared.geometry, 1 + rows * cols
    masks = vispruner_picks(maps[padded(CLS_FEATURE)], maps[padded(HIDDEN_FEATURE)], per_crop, 0.5)
    selection = make("vispruner", paper_code=True).select(Signals(g, per_crop * crops, maps))
    fed = vispruner_fed(masks, rows, cols)
    if name == "square":  # no padding: exactly what it feeds, in its order
        assert kept_rows(prepared, selection) == fed
    assert kept_rows(prepared, selection) == [r for r in fed if r in real_rows(prepared)]
    lost = sum(selection.stats["padding picked"].values())
    assert lost == len(fed) - len(selection.keep) and (lost > 0) == (name != "square")
    assert len(fed) == per_crop * crops  # T per crop, no newline (README: "32 * 5 = 160")


# --- DivPrune: vbdi/divprune 799e2d9, LLaVA/llava/model/llava_arch.py (CC BY-NC 4.0: read, not copied)


def divprune_picks(features: torch.Tensor, ratio: float) -> list[int]:
    """The official greedy in pick order, repeats included: `DivPrune` (L152-171) with the cosine matrix
    of `pairwise_cosine_similarity` (L147-150), on the projected tokens in the model's fp16."""
    k = int(round(ratio * len(features)))  # L153
    unit = features.half() / features.half().norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picks: list[int] = []
    for i in range(k):
        if i == 0:  # the second-smallest entry of every column: the nearest other token
            scores = distance.sort(dim=0).values[1]
        else:  # every column's smallest entry among the rows picked so far
            scores = distance[torch.tensor(picks)].min(dim=0).values
        picks.append(int(scores.argmax()))
    return picks


@pytest.mark.parametrize("ratio", [0.098, 0.2])
def test_divprune_paper_code_keeps_what_the_official_code_keeps(image, ratio):
    _, prepared, maps, _ = image
    g, features = prepared.geometry, maps[FEATURES]
    picks = divprune_picks(features, ratio)
    selection = make("divprune", paper_code=True).select(Signals(g, len(picks), maps))
    assert selection.keep.tolist() == sorted(set(picks))  # the code feeds a repeated pick twice, here once


# --- every vision method's "Differs from the paper" line, on the example it quotes -----------------


@pytest.fixture(scope="module")
def square(backend):
    """A square image's geometry on LLaVA-NeXT (the 7B's crops, patch and pinpoints: 2928 tokens) and its signals."""
    prepared = backend.prepare(photo(672, 672, seed=6), PROMPT)
    with torch.no_grad():
        _, maps = backend.encode(prepared, (*NEEDS, "cls-logits@last", "cls-onehead@last", "keys@last"))
    return prepared.geometry, maps


def budgets(selection, g) -> list[int]:
    return [selection.budgets[name] for name in g.names]


def test_hired_takes_585_of_2928_tokens_at_0_2_where_the_code_takes_576(square):
    g, maps = square
    assert len(g) == 2928 and Budget(fraction=0.2).resolve(len(g)) == 585
    assert len(make("hired").select(Signals(g, 585, maps)).keep) == 585  # met exactly, on real tokens
    assert int(0.2 * 576 * 5) == 576  # the code's total at its rate 0.2, modeling_llava_next.py L538
    official = make("hired", paper_code=True).select(Signals(g, 576, maps))
    assert budgets(official, g)[0] == 288 and len(official.keep) == sum(budgets(official, g)) <= 576


def test_cls_splits_145_by_size_where_the_code_keeps_29_per_crop(square):
    g, maps = square
    assert budgets(make("cls").select(Signals(g, 145, maps)), g) == [29, 29, 29, 28, 28, 2]
    assert 29 * 5 == 145  # FasterVLM's README, LLaVA-NeXT at 95% reduction


def test_vtc_cls_ranges_on_clip_l_from_layer_16_or_all_23_layers():
    from backends.signals import parse

    def layers(n: int) -> list[int]:  # CLIP-L: 24 layers, the feature layer 22
        return [parse(name, "CLIP-L", 24, 22)[1] for name in make("vtc-cls", layers=n).needs]

    assert layers(7) == list(range(16, 23)) and layers(23) == list(range(23)) and layers(2) == [21, 22]
    assert make("vtc-cls").layers == 2


def test_visionzip_spends_64_on_54_patches_and_10_contextual_where_the_code_spends_one_on_cls(square):
    g, maps = square
    ours = make("visionzip").select(Signals(g, 320, maps))  # 64 per partition, no newline
    official = make("visionzip", paper_code=True).select(Signals(g, 320, maps))  # 64 per crop
    for selection, dominant in ((ours, 54), (official, 53)):
        for p in range(len(g.names) - 1):
            kept = selection.keep[g.partition[selection.keep] == p]
            targets = int(selection.maps["contextual"][kept].sum())
            assert (len(kept) - targets, targets) == (dominant, 10)
    assert budgets(ours, g)[-1] == 0 == budgets(official, g)[-1]
    everything = make("visionzip").select(Signals(g, len(g), maps))  # newlines get what the crops cannot hold
    assert len(everything.keep) == len(g)


def test_vispruner_splits_160_by_size_where_the_code_keeps_32_per_crop(square):
    g, maps = square
    assert budgets(make("vispruner").select(Signals(g, 160, maps)), g) == [32, 32, 31, 31, 31, 3]
    official = make("vispruner", paper_code=True).select(Signals(g, 160, maps))
    assert budgets(official, g) == [32] * 5 + [0] and len(official.keep) == 160  # "32 * 5 = 160", no newline


def test_divprune_floors_0_1_of_576_to_57_where_the_code_rounds_to_58():
    assert Budget(fraction=0.1).resolve(576) == 57 and int(round(0.1 * 576)) == 58


def test_globalcom2_gives_the_newlines_what_they_need_at_most_half_the_budget(square):
    g, maps = square
    assert budgets(make("globalcom2").select(Signals(g, 20, maps)), g)[-1] == 10  # half of 20
    assert budgets(make("globalcom2").select(Signals(g, 585, maps)), g)[-1] == 48  # all 48 rows


def test_prumerge_keeps_a_partitions_top_token_when_it_has_no_outlier():
    from explorer.core import Geometry

    g = Geometry(("image",), torch.zeros(12, dtype=torch.long), torch.zeros(12, 2), torch.zeros(12, 4), (1, 1))
    keys = torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(0))
    attention = torch.linspace(1.0, 0.5, 12)  # no value above Q3 + 1.5 IQR: the code would divide by 0
    flat = Signals(g, 12, {"cls-onehead@last": attention, "keys@last": keys, "hidden@feature": torch.ones(12, 4)})
    selection = make("prumerge+", adaptive=True).select(flat)
    assert selection.stats["outliers"] == {"image": 1} and 0 in selection.keep.tolist()  # its top token


def test_transprune_reads_the_feature_layer_alone_by_default():
    assert make("transprune").needs == ("hidden@feature-1", "hidden@feature")  # its input and its output


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, tokens", [("hired", 460), ("visionzip", 256), ("vispruner", 128), ("divprune", 214)])
def test_paper_code_runs_end_to_end_and_the_llm_gets_the_kept_tokens(backend, method, tokens):
    image = photo(1000, 300, seed=5)  # a 1x3 grid with padding
    embeds = []
    hook = backend.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"][0]), with_kwargs=True
    )
    try:
        result = run(
            backend, image, PROMPT, method, Budget(tokens=tokens), settings={"paper_code": True}, max_new_tokens=1
        )
    finally:
        hook.remove()
    assert result.settings["paper_code"] is True and result.tokens["visual_budget"] == tokens
    assert 0 < result.tokens["visual_kept"] == len(result.selection.keep) <= tokens
    assert embeds[0].shape[0] == result.tokens["text"] + result.tokens["visual_kept"]  # the LLM's sequence


def test_paper_code_on_a_model_whose_tokens_fold_several_patches_is_one_clear_message():
    from test_families import loaded

    with pytest.raises(ExplorerError, match="Qwen2-VL makes the visual tokens of this image from several"):
        run(
            loaded("tiny-qwen2-vl"),
            photo(300, 200),
            PROMPT,
            "vispruner",
            0.2,
            settings={"paper_code": True},
            max_new_tokens=1,
        )
