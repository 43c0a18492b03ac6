"""InternVL3 (backends/internvl.py) on its tiny random-weight model (InternVL3-1B-hf's processor geometry, its
LLM's 24 layers and 32768 positions at tiny widths), loaded through `backends.load`: no reduction answers as
stock generate() does (and the LLM gets the stock logits); the geometry is the processor's (tiles row by row,
the thumbnail last) and every box covers the pixels its token saw; the visual-token counts are the published
processor rule's; the [CLS] attention is the stock eager encoder's; HiRED, GlobalCom2 and VisionZip meet their
budgets, FastV runs inside the LLM, and the methods that cannot run say why; the chat format; a batch gives each prompt
the logits it gets alone; InternVL3.5's Qwen3 LLM scores with normalised queries and keys; the
stored 1B architecture and the computed vision cost."""

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_tiles, photo
from PIL import Image

import backends
from explorer import Budget, ExplorerError, run, run_batch
from explorer.core import LLM_ATTENTION
from explorer.engine.cost import parameters
from explorer.methods import METHODS, unavailable

PROMPT = "What is shown in this image?"
# The published processor's rule (1 to 12 tiles of 448 px whose grid's aspect ratio is closest to the image's,
# more tiles on a tie while the image has over half their area; a thumbnail when there are several; 256
# tokens a tile): 336x336 -> 1x1, no thumbnail: 256; 672x672 -> 2x2 (1:1 ties 1x1 and 3x3; 672^2 > 448^2 * 4 / 2)
# + 1 = 1280; 1024x768 -> 4x3 (4:3 exactly) + 1 = 3328; 1920x1080 -> 4x2 (2:1 ties 2x1, 0.22 off 16:9; 5x3 is
# 15 tiles) + 1 = 2304.
COUNTS = {(336, 336): 256, (672, 672): 1280, (1024, 768): 3328, (1920, 1080): 2304}


@pytest.fixture(scope="module")
def internvl():
    return backends.load("tiny-internvl3", "cpu")


def folder() -> str:
    return backends._random_checkpoint("tiny-internvl3").name


def test_none_answers_token_for_token_as_stock_generate(internvl):
    assert type(internvl) is backends.BACKENDS["internvl"] and internvl.cls_token and internvl.thumbnail
    assert internvl.depth == 24 and internvl.max_positions == 32768  # Qwen2.5-0.5B's, InternVL3-1B's LLM
    image = photo(640, 480, seed=3)
    result = run(internvl, image, PROMPT, "none", max_new_tokens=6, min_new_tokens=6)
    stock = transformers.InternVLForConditionalGeneration.from_pretrained(folder())
    prepared = internvl.prepare(image, PROMPT)
    with torch.inference_mode():
        out = stock.generate(**prepared.inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        features, _ = internvl.encode(prepared, ())
        inputs = internvl.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
        ours, want = internvl.model(**inputs).logits[0], stock(**prepared.inputs).logits[0]
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)  # every position of the prompt


@pytest.mark.parametrize("size", sorted(COUNTS))
def test_token_counts_are_the_published_processors(internvl, size):
    width, height = size
    g, _ = internvl.layout([height, width])
    assert len(g) == COUNTS[size]
    assert g.names[-1] == "global" and g.thumbnail == len(g.names) - 1 and len(g.crops) == len(g.names) - 1


@pytest.mark.parametrize("size", [(640, 480), (1600, 400), (300, 1200), (336, 336)])
def test_geometry_is_the_processors_and_tiles_the_image(internvl, size):
    width, height = size
    prepared = internvl.prepare(photo(width, height), PROMPT)
    g = prepared.geometry
    assert len(g) == int((prepared.inputs["input_ids"] == internvl.image_token_id).sum())
    assert len(prepared.inputs["pixel_values"]) == len(g.names) and g.sizes() == [256] * len(g.names)
    for p in range(len(g.names)):  # a 16x16 grid in raster order
        cells = g.cells[g.members(p)]
        assert torch.equal(cells[:, 0] * 16 + cells[:, 1], torch.arange(256))
    assert_tiles(g.boxes[g.members(g.thumbnail)], (0, 0, width, height))
    if g.crops:
        assert_tiles(g.boxes[torch.isin(g.partition, torch.tensor(g.crops))], (0, 0, width, height))


def test_every_box_covers_the_pixels_its_token_saw(internvl):
    """On an image whose colour encodes the position (red = x, green = y), each token's 2x2 patches (28x28
    pixels of its tile) average to a point inside its box."""
    width, height = 900, 500
    x, y = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)
    pixels = np.stack([x * 255, y * 255, np.zeros_like(x)], -1).round().astype(np.uint8)
    prepared = internvl.prepare(Image.fromarray(pixels), "hi")
    ip = internvl.processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    values = prepared.inputs["pixel_values"].view(-1, 3, 16, 28, 16, 28).mean((3, 5))  # (tiles, 3, 16, 16)
    colour = values.permute(0, 2, 3, 1).reshape(-1, 3) * std + mean  # (N, 3) in raster order of each tile
    g = prepared.geometry
    order = g.partition * 256 + g.cells[:, 0] * 16 + g.cells[:, 1]  # each token's block of its tile
    seen = colour[order, :2] * torch.tensor([width, height])  # (N, 2) the mean pixel position it saw
    inside = (seen >= g.boxes[:, :2] - 2) & (seen <= g.boxes[:, 2:] + 2)
    assert inside.all() and len(g.names) > 2


def test_cls_attention_is_the_stock_encoders(internvl):
    """[CLS]'s attention to the patches, heads summed, as the stock eager encoder returns it (each token the
    mean of its 2x2 patches); keys and the feature layer's outputs project to the LLM's features."""
    prepared = internvl.prepare(photo(700, 500, seed=5), PROMPT)
    with torch.inference_mode():
        asked = ("features", "cls@0", "cls-heads@0", "cls@feature", "hidden@feature")
        features, signals = internvl.encode(prepared, asked)
        eager = transformers.InternVLForConditionalGeneration.from_pretrained(folder(), attn_implementation="eager")
        attentions = eager.model.vision_tower(prepared.inputs["pixel_values"], output_attentions=True).attentions
        projected = internvl.project(signals["hidden@feature"])
    for layer, attention in (("0", attentions[0]), ("feature", attentions[-1])):  # (tiles, h, 1 + T, 1 + T)
        want = internvl.tokens_of(prepared, attention[:, :, 0, 1:].sum(1), fold="mean")  # (N,)
        torch.testing.assert_close(signals[f"cls@{layer}"], want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(signals["cls-heads@0"].sum(1), signals["cls@0"])  # (N, heads), as the layers view reads
    torch.testing.assert_close(projected, features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [0.25, 0.1])
@pytest.mark.parametrize("method", ["hired", "globalcom2", "visionzip", "fastv"])
def test_methods_meet_their_budgets(internvl, method, budget):
    """HiRED (a thumbnail beside the tiles, its setting), GlobalCom2, VisionZip (merging), and FastV cutting
    inside the LLM (its budget after the cut), on a 1x2-tile image: 3 x 256 tokens."""
    after = {"budget_after_cuts": True} if method == "fastv" else {}
    result = run(internvl, photo(896, 448, seed=1), PROMPT, method, budget, settings=after, max_new_tokens=1)
    b = Budget(fraction=budget).resolve(768)
    assert len(result.geometry) == 768 and result.tokens["generated"] == 1
    assert result.tokens["visual_kept"] == len(result.selection.keep) == b
    if method == "hired":  # the thumbnail keeps alpha = 0.5 of the budget
        assert result.selection.budgets["global"] == b // 2


def test_methods_that_cannot_run_say_why(internvl):
    reasons = {name: unavailable(name, internvl) for name in METHODS}
    clips = {name for name, method in METHODS.items() if "clip" in method.requires}
    assert {name for name, reason in reasons.items() if reason} == clips | {"tome-vit"}
    assert "InternVL3" in reasons["tome-vit"] and "projected on its own" in reasons["tome-vit"]
    with pytest.raises(ExplorerError, match="several encoder patches"):  # the official code's padded grids
        run(internvl, photo(448, 448), PROMPT, "hired", 0.2, settings={"paper_code": True}, max_new_tokens=1)


def test_the_chat_format(internvl):
    """One user turn, no system turn: <img>, 256 <IMG_CONTEXT> a tile, </img>, a newline, the prompt."""
    prepared = internvl.prepare(photo(896, 448), PROMPT)
    text = internvl.tokenizer.decode(prepared.inputs["input_ids"][0])
    image = "<img>" + "<IMG_CONTEXT>" * 768 + "</img>"
    assert text == f"<|im_start|>user\n{image}\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_a_batch_gives_each_prompt_its_own_logits(internvl):
    """Two images of 1 and 3 tiles, each with its own kept tokens, in one call: the kept tokens of both joined
    in the batch's order, as InternVL takes them, give each prompt the logits it gets alone; run_batch too."""
    images = [photo(448, 448, seed=1), photo(896, 448, seed=2)]
    each = []
    with torch.inference_mode():
        for image, step in zip(images, [3, 2]):
            prepared = internvl.prepare(image, PROMPT)
            features, _ = internvl.encode(prepared, ())
            each.append(internvl.generate_inputs(prepared, features, torch.arange(0, len(prepared.geometry), step)))
        batched = internvl.model(**internvl.batch_inputs(each)).logits[:, -1]  # (2, V)
        alone = torch.stack([internvl.model(**inputs).logits[0, -1] for inputs in each])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    batch = run_batch(internvl, images, PROMPT, "random", [0.5, 0.2], max_new_tokens=3, min_new_tokens=3)
    alone = [run(internvl, i, PROMPT, "random", b, max_new_tokens=3).answer for i, b in zip(images, [0.5, 0.2])]
    assert batch.answers == alone and [t["visual_kept"] for t in batch.tokens] == [128, 153]


def test_internvl3_5s_qwen3_llm_scores_with_normalised_queries_and_keys(internvl):
    """InternVL3.5 (a Qwen3 LLM, which normalises each head's queries and keys before RoPE): the attention the
    LLM-stage hooks score with is the stock eager model's."""
    config, _ = backends.RANDOM["tiny-internvl3"]("tiny-internvl3")
    text = {k: v for k, v in config.text_config.to_dict().items() if k != "layer_types"}  # the 24 Qwen2 layers' kinds
    config.text_config = transformers.Qwen3Config(
        **text | {"model_type": "qwen3", "num_hidden_layers": 3, "head_dim": 8}
    )
    torch.manual_seed(0)
    backend = type(internvl)(transformers.InternVLForConditionalGeneration(config).eval(), internvl.processor, "3.5")
    backend.model.set_attn_implementation("eager")
    assert backend.decoder().qk_norm and not internvl.decoder().qk_norm
    prepared = backend.prepare(photo(448, 448, seed=1), PROMPT)
    ids = prepared.inputs["input_ids"][0]
    image = (ids == backend.image_token_id).nonzero()[:, 0]  # (N,)
    text = torch.arange(int(image.max()) + 1, len(ids))  # (T,) the prompt after the image
    seen = {}

    def choose(cut, maps, alive):  # read the signals, keep every token
        seen.update(maps)
        return alive.nonzero()[:, 0]

    with torch.inference_mode():
        features, _ = backend.encode(prepared, ())
        inputs = backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
        stock = backend.model(**inputs, output_attentions=True).attentions[1][0]  # (H, L, L) at layer 1
        with backend.pruning(prepared, [(2, 1)], (LLM_ATTENTION,), choose, True):
            backend.model(**inputs)
    torch.testing.assert_close(seen[LLM_ATTENTION].float(), stock[:, text][:, :, image].float(), rtol=1e-4, atol=1e-5)


def test_a_full_size_architecture_is_stored(internvl):
    """Built on the meta device (no memory) from backends/configs/: InternViT-300M and Qwen2.5-0.5B's 24 layers,
    the tiny model's image geometry, and as many weights as the analytic cost counts (biases and norms left
    out): 0.94e9, InternVL3-1B's size with a separate LM head."""
    config = backends.stored_config("OpenGVLab/InternVL3-1B-hf")
    assert config.model_type == "internvl" and config.vision_config.num_hidden_layers == 24
    built = backends.full_size("OpenGVLab/InternVL3-1B-hf", torch.device("meta"))
    assert type(built) is type(internvl) and built.depth == 24 and built.vision_layers == 24
    assert len(built.layout([768, 1024])[0]) == len(internvl.layout([768, 1024])[0]) == 3328
    count = sum(p.numel() for p in built.model.parameters())
    assert abs(count - 0.94e9) < 0.005e9 and 0 < count - parameters(built.model.config) < 0.001 * count


def test_the_computed_vision_cost_is_what_torch_counts(internvl, monkeypatch):
    """The vision FLOPs computed for InternViT ([CLS] included), the recomputed [CLS] maps and the projector on
    2x2 folded patches (explorer/engine/cost.py) are within 5% of torch's count, with eager attention; a run on
    the tiny model is projected on the stored 1B architecture."""
    from test_vision_cost import counted_run

    internvl.model.set_attn_implementation("eager")
    try:
        for method in ("none", "cls", "visionzip"):
            result, counted = counted_run(internvl, photo(448, 448), method, monkeypatch)
            assert abs(result.cost["vision_flops"] - counted) <= 0.05 * counted, (method, counted)
            assert result.cost["projected"]["model"] == "OpenGVLab/InternVL3-1B-hf"
    finally:
        internvl.model.set_attn_implementation("sdpa")
