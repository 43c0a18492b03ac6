"""Build a loadable checkpoint folder from a mirror of a published checkpoint (a folder of this one).

A mirror holds the published configuration files of a Hub checkpoint, never its weights: config.json,
preprocessor_config.json, processor_config.json, video_preprocessor_config.json and chat_template.json
where the Hub repo has them, generation_config.json where it was found, and special_tokens.json (the
tokenizer's special and added tokens with their ids, its bos/eos/unk/pad, whether it prepends bos, and
its length); SOURCES.md says where each value came from.

`build` shrinks only the layer counts and widths of config.json (vision and text: hidden size, layers,
heads, MLP; Qwen's text keeps the head size its M-RoPE sections need) and keeps every other value:
token ids, image and patch sizes, grid pinpoints, feature layer and strategy, scale factor, rope and
M-RoPE settings, vocabulary size. It writes the published files as they are (config.json shrunk, in
the published layout), a small byte-level BPE tokenizer whose special tokens sit at their real ids
(the vocabulary is filled up to the real length), and random weights, seeded. The processor classes
are the published ones: transformers picks them from the published files when the folder is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

MIRRORS = Path(__file__).parent
COPIED = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "video_preprocessor_config.json")
VISION = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
TEXT_MLP = 64
CORPUS = (
    "USER: ASSISTANT: User: Assistant: user assistant system You are a helpful assistant. "
    "What is shown in this image? Describe the photo, the chart and the text in it."
)


def names() -> list[str]:
    """Every mirror, as owner--name."""
    return sorted(p.name for p in MIRRORS.iterdir() if (p / "config.json").is_file())


def published(name: str, file: str = "config.json") -> dict:
    return json.loads((MIRRORS / name / file).read_text())


def build(name: str, folder: Path) -> Path:
    """The checkpoint folder of mirror `name` (owner--name), built in `folder`."""
    mirror = MIRRORS / name
    folder.mkdir(parents=True, exist_ok=True)
    config = shrink(published(name))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for file in COPIED:
        if (mirror / file).is_file():
            shutil.copy(mirror / file, folder / file)
    tokenizer(published(name, "special_tokens.json")).save_pretrained(folder)
    torch.manual_seed(0)
    model_class = getattr(transformers, config["architectures"][0])
    model_class(transformers.AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))  # as published, not as re-serialised
    generation = mirror / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, folder / "generation_config.json")
    return folder


def shrink(config: dict) -> dict:
    """The published config with small layer counts and widths, every other value kept."""
    config = json.loads(json.dumps(config))
    nested = "text_config" in config  # LLaVA, OneVision, Idefics3; Qwen2-VL keeps its LLM's keys at the top
    text = config["text_config"] if nested else config
    sections = (text.get("rope_scaling") or {}).get("mrope_section")
    if sections:  # M-RoPE splits each head into these sections: the head keeps its published size
        text |= {**TEXT, "hidden_size": 2 * sum(sections), "num_attention_heads": 1}
    else:
        text |= TEXT
    text["intermediate_size"] = TEXT_MLP
    if "head_dim" in text:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    vision = config["vision_config"]
    if config["model_type"] == "qwen2_vl":  # the merger's output is the LLM's width
        vision |= {"depth": 3, "embed_dim": 32, "num_heads": 2, "hidden_size": text["hidden_size"]}
    elif config["model_type"] == "qwen2_5_vl":
        depth, full = 8, set(vision["fullatt_block_indexes"])  # every 4th block of 32 -> every 2nd of 8
        vision |= {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": text["hidden_size"]}
        vision["fullatt_block_indexes"] = [i for i in range(depth) if (i + 1) * vision["depth"] // depth - 1 in full]
        vision["depth"] = depth
    elif config["model_type"] == "qwen3_vl":  # DeepStack from blocks 5, 11, 17 of 24 -> 0, 1, 2 of 4
        depth, stacked = 4, vision["deepstack_visual_indexes"]
        vision |= {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": text["hidden_size"]}
        vision["deepstack_visual_indexes"] = [i * depth // vision["depth"] for i in stacked]
        vision["depth"] = depth
        text["num_hidden_layers"] = len(stacked) + 1  # an LLM layer for each DeepStack layer to feed, and one more
    elif config["model_type"] == "qwen3_5":  # one group of three linear-attention layers and a full-attention one
        vision |= {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 32}
        rope = text["rope_parameters"]  # a head rotates partial_rotary_factor of itself, in the M-RoPE sections
        text |= {"num_hidden_layers": 4, "layer_types": text["layer_types"][:4], "hidden_size": 32}
        text["head_dim"] = int(2 * sum(rope["mrope_section"]) / rope["partial_rotary_factor"])
        text |= {"linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16}
        text["linear_value_head_dim"] = 16
    elif config["model_type"] == "gemma3":  # five sliding-window layers and a global one; heads of the small width
        vision |= VISION
        text |= {"num_hidden_layers": 6, "head_dim": text["hidden_size"] // text["num_attention_heads"]}
    else:
        vision |= VISION
    return config


def tokenizer(specials: dict):
    """A byte-level BPE tokenizer of the published length with the published special tokens at their
    ids: pieces learnt from a small corpus fill the free ids from the bottom, placeholders the rest."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokens = specials["tokens"]  # token -> id
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learner.train_from_iterator([CORPUS], trainer)
    learnt = json.loads(learner.to_str())["model"]
    pieces = iter(sorted(learnt["vocab"], key=learnt["vocab"].get))
    taken = set(tokens.values())
    vocab = dict(tokens)
    for i in range(specials["len_tokenizer"]):
        if i not in taken:
            vocab[next(pieces, f"<|unused_{i}|>")] = i
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learnt["merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    if specials["add_bos_token"]:
        bos = specials["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokens[bos])])
    roles = {f"{k}_token": specials[f"{k}_token"] for k in ("bos", "eos", "unk", "pad") if specials[f"{k}_token"]}
    extra = specials.get("extra_special_tokens", {})
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **roles, extra_special_tokens=extra)
