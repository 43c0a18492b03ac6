"""Every model family but LLaVA-NeXT (which the other tests cover): loaded from a saved folder through
the production path, token for token equal to stock generate() without reduction, geometry equal to
the processor's image tokens and exact on the image, every method that applies meeting its budget,
and Qwen2-VL's kept tokens keeping their M-RoPE positions."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_tiles, photo
from PIL import Image

import backends
from backends.qwen2_vl import MAX_PIXELS
from explorer import Budget, ExplorerError, make, run
from explorer.engine import fidelity
from explorer.engine.llm import LlmStage
from explorer.methods import METHODS, unavailable
from explorer.views import visual as vis

ROOT = Path(__file__).parent.parent
FAMILIES = [
    "tiny-llava-onevision",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-smolvlm",
    "tiny-idefics3",
    "tiny-llava-1.5",
    "tiny-internvl3",
]
SMOLVLM = {"tiny-smolvlm", "tiny-idefics3"}  # SmolVLM2 (model type smolvlm) and SmolVLM-256M (idefics3)
PROMPT = "What is in this picture?"
THUMBNAILED = {"tiny-llava-onevision", *SMOLVLM, "tiny-internvl3"}  # a thumbnail beside crops: GlobalCom2 applies
CLS_TOKEN = {"tiny-llava-1.5", "tiny-internvl3"}  # CLIP's and InternViT's [CLS] (test_internvl.py checks the latter)
PATCH_TOKENS = {"tiny-llava-1.5", "tiny-llava-onevision"}  # every token one patch (OneVision: unless resampled)
CLIPS_ONLY = {name for name, method in METHODS.items() if "clip" in method.requires}  # frames, the video methods


def cannot(name: str) -> set[str]:
    """The methods that cannot run on the family of the tiny model `name`."""
    thumbnail = set() if name in THUMBNAILED else {"globalcom2"}
    return CLIPS_ONLY | thumbnail | (set() if name in PATCH_TOKENS else {"tome-vit"})


@functools.cache
def loaded(name: str):
    """Each tiny model built once into a temporary folder and loaded back through `backends.load`,
    the production path."""
    return backends.load(name, "cpu")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    """(preset name, backend) of every family."""
    return request.param, loaded(request.param)


@pytest.fixture(scope="session", params=[f for f in FAMILIES if f.startswith("tiny-qwen")])
def qwen(request):
    """(preset name, backend) of the Qwen2-VL family: M-RoPE positions and the pixel cap."""
    return request.param, loaded(request.param)


@pytest.fixture(scope="session", params=[f for f in FAMILIES if f not in CLS_TOKEN])
def clsless(request):
    """(preset name, backend) of the families whose encoder has no [CLS] token (LLaVA-1.5's CLIP and
    InternVL's InternViT have one; tests/test_vision_methods.py and tests/test_internvl.py compare their [CLS]
    attention with the stock encoders')."""
    return request.param, loaded(request.param)


def folder(name: str) -> str:
    return backends._random_checkpoint(name).name


def test_loads_a_saved_folder_through_the_production_path(family):
    name, backend = family
    again = backends.load(folder(name), "cpu")  # a local checkpoint folder, as a user would pass it
    assert type(again) is type(backend) is backends.BACKENDS[backend.model.config.model_type]
    assert not again.random_weights and backend.random_weights and again.name == folder(name)
    assert backend.thumbnail == (name in THUMBNAILED)
    for key, value in backend.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value)


def test_without_reduction_the_answer_is_stock_generate_token_for_token(family):
    name, backend = family
    image = photo(640, 480, seed=3)
    result = run(backend, image, PROMPT, "none", max_new_tokens=8, min_new_tokens=8)
    stock = getattr(transformers, backend.model_class).from_pretrained(folder(name))
    prepared = backend.prepare(image, PROMPT)
    with torch.inference_mode():
        out = stock.generate(**prepared.inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()


SIZES = [(640, 640), (1600, 400), (300, 1200), (1920, 1080), (3, 2)]  # square, wide, tall, big, tiny


@pytest.mark.parametrize("size", SIZES)
def test_geometry_matches_the_processor_and_tiles_the_image(family, size):
    name, backend = family
    width, height = size
    prepared = backend.prepare(photo(width, height), PROMPT)
    g = prepared.geometry
    assert len(g) == int((prepared.inputs["input_ids"] == backend.image_token_id).sum())
    assert len(backend.layout([height, width])[0]) == len(g) and g.image_size == (width, height)
    boxed = ~g.boxes[:, 0].isnan()
    assert all(g.names[p] == "newline" for p in g.partition[~boxed])
    boxes = g.boxes[boxed]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    for p, part in enumerate(g.names):  # a full rectangle of cells in raster order, tiling its region
        members = g.members(p)
        if part == "newline" or not len(members):
            continue
        rows, cols = g.grid(p)
        cells = g.cells[members] - g.cells[members].amin(0)
        assert len(members) == rows * cols
        assert torch.equal(cells[:, 0] * cols + cells[:, 1], torch.arange(len(members)))
        box = g.boxes[members]
        assert_tiles(box, (*box[:, :2].amin(0).tolist(), *box[:, 2:].amax(0).tolist()))
    if name == "tiny-llava-1.5":  # the central square the processor crops out, within a pixel of its resize
        side = min(width, height)
        square = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        covered = (*g.boxes[:, :2].amin(0).tolist(), *g.boxes[:, 2:].amax(0).tolist())
        assert covered == pytest.approx(square, abs=1.5 * side / 336)
        return
    for tokens in vis.views(g).values():  # the thumbnail, and the crops together, each cover the whole image
        assert_tiles(g.boxes[tokens], (0, 0, width, height))


@pytest.mark.parametrize(
    "size, counts",  # measured with each checkpoint's processor (../shared/research/ecosystem.md, section 4)
    [
        ((384, 384), {"tiny-llava-onevision": 1485, "tiny-smolvlm": 1088}),
        ((768, 768), {"tiny-llava-onevision": 3699, "tiny-qwen2-vl": 729, "tiny-smolvlm": 1088}),
        ((1024, 768), {"tiny-llava-onevision": 4725, "tiny-qwen2-vl": 999, "tiny-smolvlm": 832}),
        ((1920, 1080), {"tiny-llava-onevision": 7269, "tiny-qwen2-vl": 1222, "tiny-smolvlm": 832}),
        ((3000, 2000), {"tiny-llava-onevision": 7329, "tiny-qwen2-vl": 1247, "tiny-smolvlm": 832}),
    ],
)
def test_token_counts_are_those_of_the_checkpoints(family, size, counts):
    name, backend = family
    counts = counts | {"tiny-qwen2.5-vl": counts.get("tiny-qwen2-vl"), "tiny-idefics3": counts["tiny-smolvlm"]}
    counts |= {"tiny-llava-1.5": 576}
    if counts.get(name) is not None:
        assert len(backend.layout([size[1], size[0]])[0]) == counts[name]


def test_qwen_caps_the_pixels_of_huge_images(qwen):
    name, backend = qwen
    assert backend.processor.image_processor.size["longest_edge"] > MAX_PIXELS  # the checkpoint allows more
    n = len(backend.layout([6000, 8000])[0])
    assert n <= MAX_PIXELS // 28**2 and n > 0.9 * MAX_PIXELS // 28**2
    with pytest.raises(ExplorerError, match="cannot take a 10000x1 image"):
        backend.layout([1, 10000])  # Qwen's processor refuses aspect ratios over 200


def pixels_of_tokens(name: str, backend, prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3) the mean of the normalised pixels each visual token's patches saw, and (N,) which
    tokens have one (OneVision's resampled tokens have none)."""
    ip = backend.processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    values = prepared.inputs["pixel_values"]
    if name.startswith("tiny-qwen"):  # (P, 3 * 2 * 14 * 14) patches, 4 per token
        patches = values.view(-1, 4, 3, 2, 14, 14)[:, :, :, 0]  # first frame
        return patches.mean((1, 3, 4)) * std + mean, torch.ones(len(patches), dtype=torch.bool)
    if name in SMOLVLM or name == "tiny-internvl3":  # (1, tiles, 3, 512, 512), 8x8 tokens of 64 px per tile;
        side, cell = backend.side, values.shape[-1] // backend.side  # InternVL: (tiles, 3, 448, 448), 16x16 of 28
        tiles = values.flatten(0, -4).view(-1, 3, side, cell, side, cell).mean((3, 5))  # (tiles, 3, side, side)
        ones = torch.ones(len(tiles) * side**2, dtype=torch.bool)
        return tiles.permute(0, 2, 3, 1).reshape(-1, 3) * std + mean, ones
    side = backend.model.config.vision_config.image_size // 14  # SigLIP's 384 px make 27 patches of 14
    crops = values.flatten(0, -4)[..., : side * 14, : side * 14]  # (crops, 3, 14 * side, 14 * side)
    crops = crops.reshape(-1, 3, side, 14, side, 14).mean((3, 5)).permute(0, 2, 3, 1).reshape(-1, 3)  # (crops * T, 3)
    src = prepared.source
    return crops[src.clamp(min=0)] * std + mean, src >= 0


@pytest.mark.parametrize("size", [(800, 400), (500, 900)])
def test_every_box_covers_the_pixels_its_token_saw(family, size):
    """On an image whose colour encodes the position (red = x, green = y), the mean colour of each
    token's patches must point back inside its box."""
    name, backend = family
    width, height = size
    x, y = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)
    pixels = np.stack([x * 255, y * 255, np.zeros_like(x)], -1).round().astype(np.uint8)
    prepared = backend.prepare(Image.fromarray(pixels), "hi")
    g = prepared.geometry
    colour, has = pixels_of_tokens(name, backend, prepared)
    checked = 0
    for t in has.nonzero()[:, 0].tolist():
        x0, y0, x1, y1 = g.boxes[t].tolist()
        if x0 == 0 or y0 == 0 or x1 == width or y1 == height:
            continue  # padding and resampling blur the border
        slack_x, slack_y = (x1 - x0) * 0.1 + 1, (y1 - y0) * 0.1 + 1
        r, gr = colour[t, :2].tolist()
        assert x0 - slack_x <= r * width <= x1 + slack_x, (t, g.names[g.partition[t]], r * width, (x0, x1))
        assert y0 - slack_y <= gr * height <= y1 + slack_y, (t, g.names[g.partition[t]], gr * height, (y0, y1))
        checked += 1
    assert checked > 0.5 * len(g)


def test_projecting_the_feature_layer_gives_the_features(family):
    """hidden@feature, in LLM order and folded as the projector takes it (Qwen's 2x2 merger, SmolVLM's
    pixel shuffle, Qwen2.5-VL's window order undone), projects to exactly the features the LLM gets."""
    name, backend = family
    prepared = backend.prepare(photo(900, 500, seed=5), PROMPT)
    with torch.inference_mode():
        features, signals = backend.encode(prepared, ("features", "hidden@feature"))
        projected = backend.project(signals["hidden@feature"])
    same = prepared.source >= 0 if name == "tiny-llava-onevision" else torch.ones(len(features), dtype=torch.bool)
    assert same.float().mean() > 0.3  # OneVision: the tokens the grid's resampling did not blend
    torch.testing.assert_close(projected[same], features[same], rtol=1e-4, atol=1e-5)


def test_received_attention_is_the_stock_encoders(clsless):
    """Without a [CLS] token, "cls" is the attention each patch receives, mean over heads and queries:
    compared with a stock eager SigLIP's attention weights (OneVision, SmolVLM); for the Qwen ViT,
    whose attention weights transformers does not return, each attention segment's tokens receive
    exactly one query's worth in total, windows (Qwen2.5-VL's layer 0) found in image order."""
    name, backend = clsless
    assert not backend.cls_token
    prepared = backend.prepare(photo(900, 500, seed=5), PROMPT)
    with torch.inference_mode():
        _, signals = backend.encode(prepared, ("cls@0", "cls@feature", "cls-heads@0", "cls-logits@0"))
    torch.testing.assert_close(signals["cls-heads@0"].mean(1).cpu(), signals["cls@0"], equal_nan=True)
    if name.startswith("tiny-qwen"):
        rows, cols = prepared.geometry.grid(0)
        for layer, side in (("0", 4 if name == "tiny-qwen2.5-vl" else max(rows, cols)), ("feature", max(rows, cols))):
            grid = signals[f"cls@{layer}"].view(rows, cols)
            windows = [
                grid[r : r + side, c : c + side].sum() for r in range(0, rows, side) for c in range(0, cols, side)
            ]
            torch.testing.assert_close(torch.stack(windows), torch.full((len(windows),), 0.25))  # 4 patches a token
        return
    eager = getattr(transformers, backend.model_class).from_pretrained(folder(name), attn_implementation="eager")
    inputs = prepared.inputs
    tower = eager.model.vision_model if name in SMOLVLM else eager.model.vision_tower
    pixels = inputs["pixel_values"][0]  # (crops or tiles, 3, H, W)
    with torch.inference_mode():
        attentions = tower(pixels, output_attentions=True).attentions  # per layer (crops, h, T, T)
    received = attentions[0].mean((1, 2))  # (crops, T)
    ours = signals["cls@0"]
    if name in SMOLVLM:  # 16 patches a token
        want = backend.tokens_of(prepared, received, fold="mean")
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-7)
    else:
        src = prepared.source
        torch.testing.assert_close(ours[src >= 0], received.flatten()[src[src >= 0]], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("budget", [0.1, Budget(tokens=1)])
def test_every_method_that_applies_meets_its_budget_end_to_end(family, budget):
    name, backend = family
    image = photo(448, 336, seed=1)  # small: 1728 tokens on OneVision, 832 on SmolVLM, 192 on Qwen2-VL
    for method in METHODS:
        reason = unavailable(method, backend)
        if reason:
            assert method in cannot(name) and "\n" not in reason
            because = {"tome-vit": "one encoder patch"} | dict.fromkeys(CLIPS_ONLY, "works on the frames of a video")
            because = because.get(method, "needs a thumbnail")
            with pytest.raises(ExplorerError, match=because):
                run(backend, image, PROMPT, method, budget, max_new_tokens=1)
            continue
        after = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}  # not a layer mean here
        result = run(backend, image, PROMPT, method, budget, settings=after, max_new_tokens=1)
        t, g = result.tokens, result.geometry
        b = (budget if isinstance(budget, Budget) else Budget(fraction=budget)).resolve(len(g))
        newlines = g.sizes()[g.names.index("newline")] if "newline" in g.names else 0
        expected = {"none": len(g), "hired": min(b, len(g) - newlines)}.get(method, b)
        assert t["visual_kept"] == expected == len(result.selection.keep), method
        assert result.tokens["generated"] == 1


def test_qwen_kept_tokens_keep_their_m_rope_positions(qwen):
    """The position ids the LLM gets for the kept tokens are theirs in the unreduced prompt, and the
    answer goes on after the unreduced prompt's last position."""
    name, backend = qwen
    image = photo(700, 500, seed=2)
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    handle = backend.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = run(backend, image, PROMPT, "random", 0.3, max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    prepared = backend.prepare(image, PROMPT)
    full = backend.positions(prepared)  # (3, 1, L) as the model computes them on the unreduced prompt
    stay = backend.staying(prepared, result.selection.keep)
    prefill, *steps = seen
    assert prefill.shape == (4, 1, int(stay.sum())) and len(steps) == 2
    assert torch.equal(prefill[1:], full[..., stay])  # kept tokens (and the text) where they were
    assert torch.equal(prefill[0, 0], torch.arange(int(stay.sum())))  # the short prompt's own order, for the mask
    last = int(full.max())
    assert [s[1:].flatten().tolist() for s in steps] == [[last + 1] * 3, [last + 2] * 3]


def test_methods_that_cannot_run_say_why_in_one_line(family):
    name, backend = family
    reasons = {m: unavailable(m, backend) for m in METHODS}
    assert {m for m, r in reasons.items() if r} == cannot(name)
    if name not in PATCH_TOKENS:
        assert backend.family in reasons["tome-vit"] and "projected on its own" in reasons["tome-vit"]
    if name not in THUMBNAILED:
        assert backend.family in reasons["globalcom2"] and "thumbnail" in reasons["globalcom2"]


def test_fidelity_scores_the_answer_as_generate_made_it(family):
    """Teacher forcing the unreduced answer through the reduced prompt's inputs (M-RoPE positions
    included) gives back the greedy answer, and a reduction only moves the distributions a little."""
    _, backend = family
    image = photo(500, 400, seed=4)
    answer = run(backend, image, PROMPT, "none", max_new_tokens=4, min_new_tokens=4).answer_ids
    full = fidelity.logprobs(backend, image, PROMPT, answer)
    assert full.argmax(-1).tolist() == list(answer)
    reduced = fidelity.logprobs(backend, image, PROMPT, answer, "cls", 0.5)
    assert reduced.shape == full.shape and fidelity.drift(reduced, full, answer)["kl"] >= 0


def test_the_app_offers_only_the_methods_that_run_and_says_why(family):
    import ui
    from ui.session import Session

    name, backend = family
    explorer = Session(name, "cpu")
    explorer._backend = backend  # the session's model, already loaded
    method, other, swept, explanation, layers = ui.for_model(explorer)
    runs = [m for m in METHODS if not unavailable(m, backend)]
    assert [value for _, value in method["choices"]] == other["choices"] == runs
    assert method["value"] == "hired" and set(swept["value"]) <= set(runs)  # HiRED runs on every family
    assert ("no [CLS] token" in explanation) == (not backend.cls_token) == (layers == ui.layers.RECEIVED)
    status = explorer.status()
    assert status.count("not on this model") == len(cannot(name) - CLIPS_ONLY)  # those run on clips, not images
    read, layer, *_ = ui.layers.read(
        explorer, image=str(ROOT / "assets/rocket.jpg"), prompt=PROMPT
    )  # every layer's (received) attention
    assert read["maps"].shape[:2] == (backend.vision_layers, len(read["geometry"])) and layer["value"] >= 1


def test_the_default_model_follows_the_hardware():
    assert backends.default_model("cpu") == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert backends.default_model("cuda", free_bytes=80 * 2**30) == backends.DEFAULT_MODEL
    assert backends.default_model("cuda", free_bytes=24 * 2**30) == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert backends.default_model("cuda:1", free_bytes=12 * 2**30) == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


@pytest.mark.parametrize("keep_positions", [True, False])
def test_qwen_cut_inside_the_llm_decodes_as_a_rerun_and_renumbers_all_three_axes(qwen, keep_positions):
    """FastV on Qwen2-VL: decoding on the pruned cache gives the logits of a rerun without a cache on
    the same cuts, and renumbered positions move every M-RoPE axis back by the tokens cut before."""
    name, backend = qwen
    prepared = backend.prepare(photo(448, 336, seed=6), PROMPT)
    n = len(prepared.geometry)
    with torch.inference_mode():
        features, _ = backend.encode(prepared, ())
    inputs = backend.generate_inputs(prepared, features, torch.arange(n))
    method = make("fastv", keep_positions=keep_positions, budget_after_cuts=True)
    stage = LlmStage("fastv", method, prepared.geometry, n // 4, backend.depth)
    layer = stage.cuts[0].layer
    cos_seen = []
    with (
        torch.inference_mode(),
        backend.pruning(prepared, stage.pairs, method.needs, stage.choose, keep_positions) as record,
    ):
        watch = backend.language_model.layers[layer].register_forward_pre_hook(  # after the pruning hooks
            lambda module, args, kwargs: cos_seen.append(kwargs["position_embeddings"][0]), with_kwargs=True
        )
        try:
            out = backend.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=3,
                min_new_tokens=3,
                output_logits=True,
                return_dict_in_generate=True,
            )
        finally:
            watch.remove()
    (keep,) = record.keeps
    length = inputs["input_ids"].shape[1]
    ids = inputs["input_ids"][0]
    image = (ids == backend.image_token_id).nonzero()[:, 0]
    stay = torch.ones(length, dtype=torch.bool)
    stay[image] = False
    stay[image[keep]] = True
    full = inputs["position_ids"][1:]  # (3, 1, L)
    cut_before = 0 if keep_positions else torch.arange(length)[stay] - torch.arange(int(stay.sum()))
    want, _ = backend.language_model.rotary_emb(features, full[..., stay] - cut_before)
    torch.testing.assert_close(cos_seen[0], want)  # the prefill, after the cut
    new = out.sequences[0, length:]
    for t in range(len(new)):  # the whole sequence so far, no cache, the same tokens cut
        after = full[..., -1:] + torch.arange(1, t + 1)  # (3, 1, t) the answer goes on one position a token
        order = torch.arange(length + t).view(1, 1, -1)
        replay = backend.pruning(prepared, stage.pairs, (), lambda cut, maps, alive: keep, keep_positions)
        with torch.inference_mode(), replay:
            logits = backend.model(
                input_ids=torch.cat([inputs["input_ids"], new[None, :t]], 1),
                attention_mask=torch.ones(1, length + t, dtype=torch.long),
                position_ids=torch.cat([order, torch.cat([full, after], -1)]),
                mm_encoder_outputs=inputs["mm_encoder_outputs"],
                use_cache=False,
            ).logits[0, -1]
        torch.testing.assert_close(logits, out.logits[t][0], rtol=1e-4, atol=1e-4)
