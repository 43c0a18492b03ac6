"""Every checkpoint the README and the docs name, as published: a mirror of its configuration files
(tests/mirrors/<owner>--<name>/, SOURCES.md there says where each value came from), built into a
checkpoint with small widths and random weights (tests/mirrors/build.py), loads through
`backends.load` by the path a Hub id takes, answers as stock generate() does, counts the visual tokens
the published processor counts, and builds the prompt in the published chat format."""

import functools
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from conftest import photo
from mirrors import build

import backends
from backends.qwen2_vl import MAX_PIXELS
from backends.qwen3_vl import MAX_PIXELS as QWEN3_MAX_PIXELS
from explorer import run, run_batch

ROOT = Path(__file__).parent.parent
PROMPT = "What is shown in this image?"
# The published chat templates rendered for one user turn [image, PROMPT] with add_generation_prompt
# (each mirror's chat template, whose source its SOURCES.md gives); the processor then expands the image marker.
VICUNA = f"USER: <image>\n{PROMPT} ASSISTANT:"
# LLaVA-OneVision's current Hub template ("Update chat_template.json", 826 B): the role and a space, the
# image, a newline before the text, no newline after <|im_end|> (SOURCES.md of the OneVision mirrors).
CHATML = f"<|im_start|>user <image>\n{PROMPT}<|im_end|><|im_start|>assistant\n"
# LLaVA-Video-7B-Qwen2-hf: the older OneVision template of the conversion script that made it (its SOURCES.md).
CHATML_CONVERTED = f"<|im_start|>user\n<image>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
QWEN = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
)
# Qwen3-VL's template (its SOURCES.md) opens no system turn unless one is given.
QWEN3 = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
# Qwen3.5's (its SOURCES.md) as the backend renders it: thinking turned off, an empty thinking block opens the answer.
QWEN35 = f"{QWEN3}<think>\n\n</think>\n\n"
SMOLVLM = f"<|im_start|>User:<image>{PROMPT}<end_of_utterance>\nAssistant:"
IDEFICS3_PROMPT = f"<|begin_of_text|>User:<image>{PROMPT}<end_of_utterance>\nAssistant:"
# Visual tokens at two image sizes (width x height), by each checkpoint's published processor rule:
# LLaVA-NeXT (336-px crops, 24x24 patches, pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008):
#   1024x768 fits best in 672x672 (scaled by 0.65625 to 672x504, the least waste), 2x2 crops = a 48x48
#   grid, unpadded to the image's 4:3 (48 * 768/1024 = 36 rows), a newline a row: 36 * 49 = 1764, plus
#   the 24x24 = 576 thumbnail = 2340; 1024x1024 fills 672x672: 48 * 49 + 576 = 2928.
NEXT = {(1024, 768): 2340, (1024, 1024): 2928}
# LLaVA-OneVision (384-px crops, 27x27 patches, pinpoints 384i x 384j, i, j = 1..6, anyres_max_9):
#   1024x768 fits in 1152x768 (the smallest pinpoint holding it unscaled): 3x2 crops = 81x54; unpadded,
#   81 * 768/1024 = 72 columns kept, (81 - 72) // 2 = 4 cut on each side, so 73; under 9 crops' worth
#   (54 * 73 < 1.1^2 * 9 * 729), not resampled: 54 * 74 + 729 = 4725; 1024x1024 fits in 1152x1152:
#   3x3 crops = 81x81, exactly 9 crops' worth: 81 * 82 + 729 = 7371.
ONEVISION = {(1024, 768): 4725, (1024, 1024): 7371}
# Qwen2-VL and Qwen2.5-VL (one token per 28x28 px, sides rounded to multiples of 28): 1024x768 ->
#   1036x756 = 37 x 27 = 999; 672x672 = 24 x 24 = 576. Both are under the backend's cap (MAX_PIXELS).
QWEN_COUNTS = {(1024, 768): 999, (672, 672): 576}
# Qwen3-VL (16-px patches: one token per 32x32 px, sides rounded to multiples of 32): 1024x768 = 32 x 24 =
#   768; 672x672 = 21 x 21 = 441. Both under the backend's cap (backends/qwen3_vl.py MAX_PIXELS).
QWEN3_COUNTS = {(1024, 768): 768, (672, 672): 441}
# SmolVLM-256M and SmolVLM2-256M (longer side to 2048 px, 512-px tiles, 64 tokens a tile): 1024x768
#   -> 2048x1536 = 4x3 tiles + the global one = 13 * 64 = 832; 1024x1024 -> 2048x2048 = 17 * 64 = 1088.
SMOL_256M = {(1024, 768): 832, (1024, 1024): 1088}
# SmolVLM-Instruct (longer side to 1536 px, 384-px tiles, (384/14)^2 / 3^2 = 81 tokens a tile):
#   1024x768 -> 1536x1152 = 4x3 tiles + 1 = 13 * 81 = 1053; 1024x1024 -> 1536x1536 = 17 * 81 = 1377.
SMOL_INSTRUCT = {(1024, 768): 1053, (1024, 1024): 1377}
# Idefics3-8B (longer side to 1456 px, 364-px tiles, (364/14)^2 / 2^2 = 169 tokens a tile): 1024x768
#   -> 1456x1092 = 4x3 tiles + 1 = 13 * 169 = 2197; 1024x1024 -> 1456x1456 = 17 * 169 = 2873.
IDEFICS3 = {(1024, 768): 2197, (1024, 1024): 2873}
# Gemma 3 (896-px SigLIP, 64x64 patches pooled 4x4): 256 tokens at any size, pan-and-scan off as published.
GEMMA3 = {(1024, 768): 256, (672, 672): 256}
GEMMA3_PROMPT = f"<start_of_turn>user\n<start_of_image>{PROMPT}<end_of_turn>\n<start_of_turn>model\n"  # <bos> added
# InternVL3 (1 to 12 tiles of 448 px, the grid's aspect ratio closest to the image's, a thumbnail beside several,
#   256 tokens a tile): 1024x768 -> 4x3 tiles + 1 = 3328; 672x672 -> 2x2 (ties 1x1 and 3x3: more tiles while the
#   image has over half their area) + 1 = 1280.
INTERNVL = {(1024, 768): 3328, (672, 672): 1280}
# InternVL3-1B-hf's template (its SOURCES.md): no system turn; the processor expands <IMG_CONTEXT>.
INTERNVL_PROMPT = f"<|im_start|>user\n<IMG_CONTEXT>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
# LLaVA-1.5: the central 336x336 crop, (336/14)^2 = 576 tokens at any size.
LLAVA = {(1024, 768): 576, (336, 336): 576}
PUBLISHED = {  # mirror -> (prompt, visual tokens by size)
    "llava-hf--llava-v1.6-vicuna-7b-hf": (VICUNA, NEXT),
    "llava-hf--llava-v1.6-vicuna-13b-hf": (VICUNA, NEXT),
    "llava-hf--llava-onevision-qwen2-0.5b-ov-hf": (CHATML, ONEVISION),
    "llava-hf--llava-onevision-qwen2-7b-ov-hf": (CHATML, ONEVISION),
    "llava-hf--LLaVA-Video-7B-Qwen2-hf": (CHATML_CONVERTED, ONEVISION),
    "Qwen--Qwen2-VL-2B-Instruct": (QWEN, QWEN_COUNTS),
    "Qwen--Qwen2-VL-7B-Instruct": (QWEN, QWEN_COUNTS),
    "Qwen--Qwen2.5-VL-3B-Instruct": (QWEN, QWEN_COUNTS),
    "Qwen--Qwen3-VL-2B-Instruct": (QWEN3, QWEN3_COUNTS),
    "Qwen--Qwen3.5-0.8B": (QWEN35, QWEN3_COUNTS),  # Qwen3-VL's processor
    "llava-hf--llava-1.5-7b-hf": (VICUNA, LLAVA),
    "HuggingFaceTB--SmolVLM-256M-Instruct": (SMOLVLM, SMOL_256M),
    "HuggingFaceTB--SmolVLM2-256M-Video-Instruct": (SMOLVLM, SMOL_256M),
    "HuggingFaceTB--SmolVLM-Instruct": (SMOLVLM, SMOL_INSTRUCT),
    "HuggingFaceM4--Idefics3-8B-Llama3": (IDEFICS3_PROMPT, IDEFICS3),
    "OpenGVLab--InternVL3-1B-hf": (INTERNVL_PROMPT, INTERNVL),
    "google--gemma-3-4b-it": (GEMMA3_PROMPT, GEMMA3),
}
FOLDERS: dict[str, tempfile.TemporaryDirectory] = {}  # kept until the tests end


@functools.cache
def built(name: str) -> Path:
    FOLDERS[name] = tempfile.TemporaryDirectory(prefix=f"{name}-")
    return build.build(name, Path(FOLDERS[name].name) / name)


@functools.cache
def loaded(name: str):
    return backends.load(str(built(name)), "cpu")  # a local folder: the path a Hub id in the cache takes


def test_every_checkpoint_the_readme_and_docs_name_has_a_mirror():
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    named = set(re.findall(r"\b(llava-hf|Qwen|HuggingFaceTB|HuggingFaceM4|google|OpenGVLab)/([\w.-]+\w)", text))
    assert {f"{owner}--{name}" for owner, name in named} <= set(build.names())
    assert set(PUBLISHED) == set(build.names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_published_checkpoint_loads_and_runs_as_published(name):
    config, specials = build.published(name), build.published(name, "special_tokens.json")
    backend = loaded(name)
    assert type(backend) is backends.BACKENDS[config["model_type"]] and not backend.random_weights
    processor = build.published(name, "preprocessor_config.json")["processor_class"]
    assert type(backend.processor).__name__ == processor
    image_token = config.get("image_token_id", config.get("image_token_index"))
    assert backend.image_token_id == image_token
    assert {t: backend.tokenizer.convert_tokens_to_ids(t) for t in specials["tokens"]} == specials["tokens"]
    assert len(backend.tokenizer) == specials["len_tokenizer"]

    image = photo(320, 240, seed=7)
    result = run(backend, image, PROMPT, "none", max_new_tokens=4, min_new_tokens=4)
    stock = getattr(transformers, config["architectures"][0]).from_pretrained(built(name), dtype=torch.float32)
    prepared = backend.prepare(image, PROMPT)
    with torch.inference_mode():
        out = stock.generate(**prepared.inputs, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert list(result.answer_ids) == out[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    n = len(prepared.geometry)
    assert run(backend, image, PROMPT, "random", 0.2, max_new_tokens=1).tokens["visual_kept"] == max(1, n // 5)

    chat, counts = PUBLISHED[name]
    published = backend.processor(images=image, text=chat, return_tensors="pt", **backend.image_options())
    assert torch.equal(published["input_ids"], prepared.inputs["input_ids"])  # the published chat format
    for (width, height), count in counts.items():  # the processor's count, which prepare() checks the layout against
        assert len(backend.prepare(photo(width, height), PROMPT).geometry) == count, (width, height)


@pytest.mark.parametrize("name", [n for n in sorted(PUBLISHED) if n.startswith("Qwen--Qwen2")])
def test_qwen_caps_the_published_pixel_limit(name):
    """The checkpoints allow 16384 tokens an image; the explorer caps them at MAX_PIXELS (1280 tokens).
    1920x1080: the published rule gives 1932x1092 = 69 x 39 = 2691 tokens; capped, the image is scaled
    by sqrt(1920 * 1080 / MAX_PIXELS) and its sides floored to multiples of 28: 1316x728 = 47 x 26 = 1222."""
    backend = loaded(name)
    image = photo(1920, 1080)
    published = backend.processor(images=image, text=QWEN, return_tensors="pt")  # the checkpoint's own limit
    assert int((published["input_ids"] == backend.image_token_id).sum()) == 2691
    assert len(backend.prepare(image, PROMPT).geometry) == 1222 <= MAX_PIXELS // 28**2


def test_qwen3_caps_the_published_pixel_limit():
    """Qwen3-VL's checkpoints allow 16384 tokens an image too; capped at 1280 (backends/qwen3_vl.py MAX_PIXELS).
    1920x1080: the published rule gives 1920x1088 = 60 x 34 = 2040 tokens; capped, the image is scaled by
    sqrt(1920 * 1080 / MAX_PIXELS) and its sides floored to multiples of 32: 1504x832 = 47 x 26 = 1222.
    The published video processor's limits are its own (4096 to 25165824 pixels a frame)."""
    backend = loaded("Qwen--Qwen3-VL-2B-Instruct")
    image = photo(1920, 1080)
    published = backend.processor(images=image, text=QWEN3, return_tensors="pt")  # the checkpoint's own limit
    assert int((published["input_ids"] == backend.image_token_id).sum()) == 2040
    assert len(backend.prepare(image, PROMPT).geometry) == 1222 <= QWEN3_MAX_PIXELS // 32**2
    size = backend.processor.video_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (4096, 25165824)


def test_llava_next_without_processor_config_counts_from_the_model_config():
    """llava-v1.6-vicuna-7b-hf may have no processor_config.json on the Hub (its mirror has none), which
    leaves transformers 5's processor without a patch size; the backend takes it from the model's config."""
    assert not (built("llava-hf--llava-v1.6-vicuna-7b-hf") / "processor_config.json").exists()
    with_file = loaded("llava-hf--llava-v1.6-vicuna-13b-hf").processor
    without = loaded("llava-hf--llava-v1.6-vicuna-7b-hf").processor
    assert transformers.AutoProcessor.from_pretrained(built("llava-hf--llava-v1.6-vicuna-7b-hf")).patch_size is None
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        assert getattr(without, key) == getattr(with_file, key), key


def test_smolvlm_pads_with_its_tokenizer_though_its_config_names_a_pad_outside_the_vocabulary():
    """SmolVLM-256M's config says pad_token_id 128002, a leftover of Llama 3, outside its 49280 tokens.
    A batch in which one answer ends first pads it with the tokenizer's <|im_end|> instead."""
    backend = backends.load(str(built("HuggingFaceTB--SmolVLM-256M-Instruct")), "cpu")  # its own, changed below
    assert build.published("HuggingFaceTB--SmolVLM-256M-Instruct")["pad_token_id"] >= len(backend.tokenizer)
    images = [photo(320, 240, seed=1), photo(320, 240, seed=2)]
    first = [run(backend, image, PROMPT, "none", max_new_tokens=1).answer_ids[0] for image in images]
    assert first[0] != first[1]
    backend.model.generation_config.eos_token_id = first[0]  # the first answer ends at once, the other goes on
    batch = run_batch(backend, images, PROMPT, "none", 1.0, max_new_tokens=3, min_new_tokens=0)
    assert batch.answers[0] == backend.tokenizer.decode(first[0]) and len(batch.answers[1]) > len(batch.answers[0])


def test_the_cpu_default_once_in_the_cache_is_chosen_and_loads_by_its_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub

    default = "HuggingFaceTB/SmolVLM-256M-Instruct"
    repo = tmp_path / "models--HuggingFaceTB--SmolVLM-256M-Instruct"
    shutil.copytree(built("HuggingFaceTB--SmolVLM-256M-Instruct"), repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert backends.choose(None, "cpu") == backends.Choice(default)  # no reason: nothing replaces it
    backend = backends.load(default, "cpu")
    assert type(backend) is backends.BACKENDS["idefics3"] and backend.name == default and not backend.random_weights


def test_each_default_falls_back_to_a_tiny_model_of_its_own_model_type():
    defaults = {backends.default_model("cpu")}
    defaults |= {backends.default_model("cuda", free_bytes=gib * 2**30) for gib in (8, 80)}
    assert set(backends.OFFLINE) == defaults
    for default, tiny in backends.OFFLINE.items():
        config, _ = backends.RANDOM[tiny](tiny)
        assert config.model_type == build.published(default.replace("/", "--"))["model_type"], default
