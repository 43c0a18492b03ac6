"""Random-weight models: the pieces each family's tiny models are built from (a small tokenizer with the
real special tokens, the LLM's and the vision tower's configs), and the builders of a tiny checkpoint
folder and of a full-size architecture from its stored config. Token counts, overlays and costs are
real; answers are gibberish."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers  # lazy: its model code loads on first use

from .loading import LOADING

CORPUS = "USER: ASSISTANT: What is shown in this image? Describe the photo, the chart and the text in it."
VICUNA = (  # llava-hf's chat template for LLaVA-1.5 and LLaVA-1.6 Vicuna: "USER: <image>\n... ASSISTANT:"
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(specials: list[str], corpus: str, **tokens):
    """A small byte-level BPE tokenizer with the given special tokens, trained on `corpus`, for the
    random-weight models; `tokens` names its bos/eos/unk/pad tokens and extra special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([corpus], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)


def llama_tokenizer():
    """The random-weight LLaVA models' tokenizer: <s>, </s>, <unk>, <pad> and <image>."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return build_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        CORPUS,
        **specials,
        extra_special_tokens={"image_token": "<image>"},
    )


def text_config(tokenizer, sizes: tuple[int, int, int, int], positions: int = 4096, **settings) -> dict:
    """A tiny LLM's config: sizes (hidden, layers, heads, mlp), `positions` (max_position_embeddings: the
    checkpoint's, which with its depth the tiny models keep; 4096 is Vicuna's), the tokenizer's vocabulary
    and bos, eos and pad ids; `settings` add to it (model_type first of all)."""
    hidden, layers, heads, mlp = sizes
    sized = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp)
    return (
        dict(vocab_size=len(tokenizer), num_key_value_heads=heads, max_position_embeddings=positions)
        | sized
        | {
            **token_ids(tokenizer),
            **settings,
        }
    )


def vision_config(model_type: str, sizes: tuple[int, int, int, int], image_size: int, patch_size: int, **settings):
    """A tiny CLIP-like vision tower's config: its model_type, sizes (hidden, layers, heads, mlp), the
    pixels of the image it takes and of a patch; `settings` add to it."""
    hidden, layers, heads, mlp = sizes
    return dict(
        model_type=model_type,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        **settings,
    )


def token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's bos, eos and pad ids as config settings."""
    return {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}


def save_random(model_class: str, config, processor, folder: Path) -> None:
    """Save a random-weight model of `config`, seeded, and its processor, to `folder`. The output rows of its
    image and video placeholder tokens are zero, so that it never answers with one, as a real model does not
    (an answer holding one cannot be read back after the prompt: the drift could not be scored)."""
    with LOADING:  # one model built at a time (loading.py)
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(config)
    placeholders = [v for k, v in config.to_dict().items() if k.endswith(PLACEHOLDERS)]
    with torch.no_grad():
        model.get_output_embeddings().weight[placeholders] = 0  # (V, D): a logit of 0, in practice below the largest
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


PLACEHOLDERS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")  # config keys


def full_size(model_class: str, tiny, stored: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight model of the stored config of a real checkpoint (layer sizes, heads, vocabulary,
    vision tower and image geometry), with the token ids of `tiny`, the config of its family's tiny model
    (whose processor it is run with), built seeded on `device`."""
    ids = tiny.to_dict()
    stored = stored | {"text_config": stored["text_config"] | _token_ids(ids["text_config"])}  # the tiny tokenizer's
    config = type(tiny).from_dict(stored | _token_ids(ids))
    with LOADING, torch.device(device):  # one model built at a time (loading.py)
        torch.manual_seed(0)
        return getattr(transformers, model_class)._from_config(config, dtype=dtype).eval()


def _token_ids(config: dict) -> dict:
    return {k: v for k, v in config.items() if k.endswith(("_token_id", "_token_index"))}
