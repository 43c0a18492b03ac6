"""Gemma 3 (backends/gemma3.py) on its tiny random-weight model (gemma-3-4b's 34-layer LLM, five sliding-window layers
to one global one, its two rotary embeddings, at tiny widths), loaded through `backends.load`: no reduction answers as
stock generate() does, with pan-and-scan off and on; the prompt is Gemma's chat format; pan-and-scan views are the
processor's crops and each token's box is the part of the image its view shows; tokens are their patches pooled as the
model pools them; tokens dropped before the LLM or cut inside it leave the kept ones with the model's own masks
(visual tokens of one image attending to each other both ways) and each layer kind's own rotary embedding (checked
against a pass written out from the model's parts, and shown to fail with one rotary embedding or a causal mask); a cut
decodes with its cache as without; a cut on a prompt longer than the sliding window is refused; every method runs or
says why, and meets its budget; batches, and the stored 4B architecture."""

import pytest
import torch
from conftest import photo

import backends
from explorer import Budget, ExplorerError, run
from explorer.engine.cost import parameters
from explorer.methods import METHODS, unavailable
from explorer.views import visual as vis

PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module")
def gemma():
    return backends.load("tiny-gemma3", "cpu")


@pytest.fixture
def panned(gemma):
    """The tiny model with pan-and-scan on, for one test."""
    gemma.pan_and_scan = True
    yield gemma
    gemma.pan_and_scan = False


@pytest.fixture(scope="module")
def encoded(gemma):
    """(prepared, features) of a 320x240 image: 256 tokens."""
    prepared = gemma.prepare(photo(320, 240, seed=3), PROMPT)
    with torch.inference_mode():
        features, _ = gemma.encode(prepared, ())
    return prepared, features


def answers_as_stock(backend, image) -> int:
    result = run(backend, image, PROMPT, "none", max_new_tokens=5, min_new_tokens=5)
    prepared = backend.prepare(image, PROMPT)
    with torch.inference_mode():
        out = backend.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    return len(prepared.geometry)


def test_none_answers_token_for_token_as_stock_generate(gemma):
    assert type(gemma) is backends.BACKENDS["gemma3"] and gemma.depth == 34 and not gemma.pan_and_scan
    kinds = gemma.decoder().kinds
    assert kinds[:6] == ("sliding_attention",) * 5 + ("full_attention",) and kinds.count("full_attention") == 5
    assert answers_as_stock(gemma, photo(320, 240, seed=1)) == 256


def test_none_answers_as_stock_with_pan_and_scan(panned):
    """640x300: the whole image and 2 crops of 320x300, 3 x 256 tokens."""
    assert answers_as_stock(panned, photo(640, 300, seed=1)) == 3 * 256


def test_the_prompt_is_gemmas_chat_format_with_one_bos(gemma):
    prepared = gemma.prepare(photo(320, 240), PROMPT)
    ids = prepared.inputs["input_ids"][0]
    image = "<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>"
    want = f"<bos><start_of_turn>user\n\n\n{image}\n\n{PROMPT}<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.tokenizer.decode(ids) == want
    assert torch.equal(prepared.inputs["token_type_ids"][0].bool(), ids == gemma.image_token_id)


@pytest.mark.parametrize(
    "size, names",
    [
        ((1024, 768), ("global", "crop 0,0", "crop 0,1")),  # 4:3, 2 crops of 512x768
        ((400, 1000), ("global", "crop 0,0", "crop 1,0", "crop 2,0")),  # 3 crops of 400x334 (the last 332 high)
        ((672, 672), ("image",)),  # square: no crops
    ],
)
def test_pan_and_scan_views_are_the_processors_crops(panned, size, names):
    """Each view's tokens tile the part of the image the processor cropped (found by running its own crop code on an
    image whose pixels hold their index), and the pixels the encoder got for that view are that part, squashed."""
    width, height = size
    image = photo(width, height, seed=2)
    prepared = panned.prepare(image, PROMPT)
    g, ip, options = prepared.geometry, panned.processor.image_processor, panned.image_options()
    assert g.names == names and len(g) == 256 * len(names)
    index = torch.arange(height * width).view(1, 1, height, width)
    settings = [options[key] for key in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops")]
    crops = ip.pan_and_scan_batched(index, *settings, options["pan_and_scan_min_ratio_to_activate"])
    views = [(0, 0, width, height)]
    for crop in crops:
        (y0, x0), (y1, x1) = divmod(int(crop[0, 0, 0, 0]), width), divmod(int(crop[0, 0, -1, -1]), width)
        views.append((x0, y0, x1 + 1, y1 + 1))
    assert len(views) == len(names)
    for p, (x0, y0, x1, y1) in enumerate(views):
        boxes = g.boxes[g.members(p)]  # (256, 4)
        assert boxes[:, :2].amin(0).tolist() == [x0, y0] and boxes[:, 2:].amax(0).tolist() == [x1, y1]
        torch.testing.assert_close(boxes[:, 2] - boxes[:, 0], torch.full((256,), (x1 - x0) / 16))
        torch.testing.assert_close(boxes[:, 3] - boxes[:, 1], torch.full((256,), (y1 - y0) / 16))
        alone = ip(image.crop((x0, y0, x1, y1)), return_tensors="pt", do_pan_and_scan=False)["pixel_values"][0]
        torch.testing.assert_close(prepared.inputs["pixel_values"][p], alone.to(torch.float32), atol=1e-5, rtol=0)


def test_pan_and_scan_overlays_draw_the_whole_image_and_the_crops(panned):
    """1024x768 with pan-and-scan: the app draws the global view and the crops as two pictures, each covering every
    pixel of the image once; a click on the right half finds a token of the right-hand crop, where its box is."""
    g = panned.prepare(photo(1024, 768), PROMPT).geometry
    drawn = vis.views(g)
    assert drawn["thumbnail"].tolist() == list(range(256)) and drawn["crops"].tolist() == list(range(256, 768))
    for tokens in drawn.values():
        assert (vis.labels(g, tokens) >= 0).all()
    width, height = vis.display_size(g)
    token = vis.token_at(g, drawn["crops"], 0.75 * width, 0.5 * height)
    assert g.names[int(g.partition[token])] == "crop 0,1"
    x0, y0, x1, y1 = g.boxes[token].tolist()
    assert x0 <= 768 < x1 and y0 <= 384 < y1


def test_pan_and_scan_token_counts(panned, gemma):
    """The published processor with pan-and-scan: 1024x768 -> 3 x 256; 1920x1080 -> round(1.78) = 2 crops, 3 x 256;
    2048x400 -> round(5.12) = 5, at most 4 crops, 5 x 256 = 1280. Off, 256 at any size."""
    for (width, height), count in {(1024, 768): 768, (1920, 1080): 768, (2048, 400): 1280}.items():
        assert len(panned.prepare(photo(width, height), PROMPT).geometry) == count, (width, height)
    gemma.pan_and_scan = False
    assert len(gemma.prepare(photo(2048, 400), PROMPT).geometry) == 256


def test_tokens_pool_their_patches_as_the_model_does(gemma, encoded):
    """The model's own features are the projection of each token's 16 patches of the last layer, as `tokens_of`
    groups them (a wrong grouping would pool other patches); the received attention pools to a mean."""
    prepared, features = encoded
    with torch.inference_mode():
        _, signals = gemma.encode(prepared, ("features", "hidden@feature", "cls@last"))
        projected = gemma.project(signals["hidden@feature"])
    torch.testing.assert_close(signals["features"], features)
    torch.testing.assert_close(projected, features, rtol=1e-4, atol=1e-5)
    attention = signals["cls@last"]  # (256,) each the mean over its 16 patches of the attention they receive
    assert attention.shape == (256,) and abs(float(attention.sum()) - 1 / 16) < 1e-5
    with pytest.raises(ExplorerError, match="several encoder patches"):
        gemma.encode(prepared, ("padded cls@feature",))


def by_hand(backend, prepared, features, keep, layer, keep_positions=True, kinds=True, both_ways=True):
    """The last prompt token's logits, from the model's parts: decoder layers 0..layer-1 on the whole prompt, the
    later ones on the text and the kept visual tokens (keep, (K,) indices into N), each layer with the mask the
    model documents (modeling_gemma3.py `create_masks_for_vision_model`, L697-755: causal, or both ways between the
    visual tokens of one image; the sliding window, 1024, is longer than the prompt) and its kind's rotary embedding
    (`Gemma3TextModel.forward`, L548-556). Renumbered (not keep_positions), a token after the cut moves back by the
    tokens cut before it. `kinds=False`: every layer with the global rotary embedding; `both_ways=False`: causal."""
    lm = backend.language_model
    ids = prepared.inputs["input_ids"]  # (1, L)
    visual = (ids[0] == backend.image_token_id).nonzero()[:, 0]  # (N,)
    dropped = visual[~torch.isin(torch.arange(len(visual)), keep)]
    x = lm.embed_tokens(ids).clone()  # (1, L, D), scaled as the model scales them
    x[0, visual] = features.to(x.dtype)
    seq = torch.arange(ids.shape[1])  # the prompt positions in the sequence
    for index, block in enumerate(lm.layers):
        if index == layer:
            stay = ~torch.isin(seq, dropped)
            seq, x = seq[stay], x[:, stay]
        image = torch.isin(seq, visual)  # (L',)
        starts = image & ~torch.cat([torch.tensor([False]), image[:-1]])
        block_id = torch.cumsum(starts, 0) * image  # (L',) the image each visual token is of, 0 for text
        n = len(seq)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if both_ways:
            mask |= (block_id[:, None] == block_id[None, :]) & image[:, None]
        kind = lm.config.layer_types[index] if kinds else "full_attention"
        positions = (seq if keep_positions or index < layer else torch.arange(n))[None]
        cos_sin = lm.rotary_emb(x, positions, kind)
        x = block(x, attention_mask=mask[None, None], position_embeddings=cos_sin, position_ids=positions)
    return backend.model.lm_head(lm.norm(x))[0, -1]


@pytest.mark.parametrize("layer, keep_positions", [(0, False), (2, True), (2, False), (5, True), (5, False)])
def test_kept_tokens_get_the_models_masks_and_each_kinds_rotary_embedding(gemma, encoded, layer, keep_positions):
    """Dropped before the LLM (layer 0: the stock model on the short prompt with its token types, renumbered) or cut before a
    sliding layer (2) or the first global one (5): the logits are the hand-written pass's, and not those of a pass with
    one rotary embedding for all layers, nor of one with a causal mask among the visual tokens."""
    prepared, features = encoded
    n = len(prepared.geometry)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(layer))[: n // 3].sort().values
    with torch.inference_mode():
        if layer == 0:
            logits = gemma.model(**gemma.generate_inputs(prepared, features, keep), use_cache=False).logits[0, -1]
        else:
            inputs = gemma.generate_inputs(prepared, features, torch.arange(n))
            with gemma.pruning(prepared, [(layer, layer)], (), lambda cut, maps, alive: keep, keep_positions) as record:
                logits = gemma.model(**inputs, use_cache=False).logits[0, -1]
            assert torch.equal(record.keeps[0], keep)
        want = by_hand(gemma, prepared, features, keep, layer, keep_positions)
        one_rotary = by_hand(gemma, prepared, features, keep, layer, keep_positions, kinds=False)
        causal = by_hand(gemma, prepared, features, keep, layer, keep_positions, both_ways=False)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, one_rotary, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(logits, causal, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("keep_positions", [True, False])
def test_a_cut_decodes_with_its_cache_as_without(gemma, encoded, keep_positions):
    """The scores of 3 generated tokens with the KV cache (the decode views: the kept columns of each kind's mask, each
    kind's rotary embedding at the renumbered positions) equal those of reruns of the whole sequence, cut each time."""
    prepared, features = encoded
    n = len(prepared.geometry)
    keep = torch.arange(0, n, 4)
    inputs = gemma.generate_inputs(prepared, features, torch.arange(n))
    scores = []
    for cache in (True, False):
        with torch.inference_mode(), gemma.pruning(prepared, [(3, 3)], (), lambda *_: keep, keep_positions):
            out = gemma.model.generate(
                **inputs, use_cache=cache, do_sample=False, max_new_tokens=3, min_new_tokens=3, output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        scores.append(torch.stack(out.scores))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


def test_a_cut_on_a_prompt_longer_than_the_sliding_window_is_refused(panned):
    """2048x400 with pan-and-scan: 1280 visual tokens, over the 1024-token window."""
    with pytest.raises(ExplorerError, match="sliding-window layers"):
        run(panned, photo(2048, 400), PROMPT, "fastv", 0.25, max_new_tokens=1)


@pytest.mark.parametrize("budget, only", [(0.25, None), (0.1, ("cls", "divprune", "visionzip", "fastv"))])
def test_every_method_runs_or_says_why_and_meets_its_budget(gemma, budget, only):
    """Every method at 25% (with a decode step: MustDrop cuts the caches of sliding-window layers then), a few at 10%."""
    image = photo(320, 240, seed=2)
    refused = {m for m in METHODS if unavailable(m, gemma)}
    assert {"globalcom2", "tome-vit"} <= refused and all(METHODS[m].requires for m in refused)
    for method in sorted(only or set(METHODS) - refused):
        settings = {"budget_after_cuts": True} if METHODS[method].stage == "llm" else {}
        result = run(gemma, image, PROMPT, method, budget, settings=settings, max_new_tokens=2)
        n = len(result.geometry)
        if method == "none" or METHODS[method].adaptive:
            assert len(result.selection.keep) <= n, method
            continue
        want = Budget(fraction=budget).resolve(n)
        assert result.tokens["visual_kept"] == want == len(result.selection.keep), method


def test_batches_carry_each_images_token_types(gemma):
    """Two prompts of different lengths (100 and 60 kept tokens): left-padded with their token types, the batch answers
    as each prompt alone."""
    each, alone = [], []
    for seed, kept in ((4, 100), (5, 60)):
        prepared = gemma.prepare(photo(320, 240, seed=seed), PROMPT)
        with torch.inference_mode():
            features, _ = gemma.encode(prepared, ())
            inputs = gemma.generate_inputs(prepared, features, torch.arange(kept))
            out = gemma.model.generate(**inputs, do_sample=False, max_new_tokens=3, min_new_tokens=3)
        each.append(inputs)
        alone.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    batch = gemma.batch_inputs(each)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and int(batch["token_type_ids"].sum()) == 160
    with torch.inference_mode():
        out = gemma.model.generate(**batch, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert [row[batch["input_ids"].shape[1] :].tolist() for row in out] == alone


def test_a_full_size_architecture_is_stored(gemma):
    """Built on the meta device (no memory) from backends/configs/: 34 LLM layers, 29 of them sliding-window ones, the
    27-layer SigLIP at 896 px, and about the 4.3e9 weights the model card gives, as many as the analytic cost counts
    (which leaves out biases and norms)."""
    assert backends.FULL_SIZE["google/gemma-3-4b-it"] == "tiny-gemma3"
    built = backends.full_size("google/gemma-3-4b-it", torch.device("meta"))
    assert type(built) is type(gemma) and built.depth == 34 and built.decoder().kinds.count("sliding_attention") == 29
    assert built.vision_layers == 27 and len(built.layout([768, 1024])[0]) == 256
    count = sum(p.numel() for p in built.model.parameters())
    assert abs(count - 4.30e9) < 0.01e9 and 0 < count - parameters(built.model.config) < 0.001 * count
