"""Issue 27: the signals the llm-stage methods read are the model's own, on every family: "llm-embeds" its input
embeddings, "llm-hidden" the hidden states entering the cut layer through the final norm (as explorer/core.py
promises), "llm-attention" each text token's attention to each visual token at the scoring layer, per head, and
their text counterparts, against the stock model's `output_hidden_states` and eager `output_attentions`."""

import pytest
import torch
from conftest import first_layers, photo

import backends
from explorer.core import LLM_ATTENTION, LLM_EMBEDS, LLM_HIDDEN, text_of

FAMILIES = [
    "tiny-llava-next",
    "tiny-llava-onevision",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-qwen3-vl",
    "tiny-smolvlm",
    "tiny-idefics3",
    "tiny-llava-1.5",
    "tiny-qwen3.5",
    "tiny-gemma3",
    "tiny-internvl3",
]
NEEDS = (LLM_ATTENTION, LLM_HIDDEN, LLM_EMBEDS)  # each also gives its text counterpart
# Qwen3.5 scores only at full-attention layers (its first: 3, the first entry of the attentions it records) and
# cuts after it; the others cut before layer 2, scored at layer 1
LAYER, RECORDED = {"tiny-qwen3.5": 4}, {"tiny-qwen3.5": 0}
HOOKED = {"tiny-qwen3.5"}  # its pruning hooks every linear-attention layer, so it runs all its layers


@pytest.mark.parametrize("name", FAMILIES)
def test_the_llm_signals_are_what_the_stock_model_computes(name):
    backend = backends.load(name, "cpu")
    backend.model.set_attn_implementation("eager")  # attention probabilities to compare with
    prepared = backend.prepare(photo(448, 336, seed=1), "What is in this picture?")
    ids = prepared.inputs["input_ids"][0]
    image = (ids == backend.visual_token_id(prepared)).nonzero()[:, 0]  # (N,) prompt positions
    text = torch.arange(int(image.max()) + 1, len(ids))  # (T,) the prompt after the image
    seen = {}

    def choose(cut, maps, alive):  # read the signals, keep every token
        seen.update(maps)
        return alive.nonzero()[:, 0]

    layer = LAYER.get(name, 2)  # a cut before this layer, scored at the one before
    with torch.inference_mode():
        features, _ = backend.encode(prepared, ())
        inputs = backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
        with first_layers(backend, layer + 1):  # all that is read: up to the cut, the input of layer `layer`
            stock = backend.model(**inputs, output_hidden_states=True, output_attentions=True)
        assert len(stock.hidden_states) == layer + 2  # the embeddings, then each layer run: `layer` is not the last
        with first_layers(backend, backend.depth if name in HOOKED else layer + 1):
            with backend.pruning(prepared, [(layer, layer - 1)], NEEDS, choose, True):
                backend.model(**inputs)
        entering = stock.hidden_states[layer][0].clone()  # (L, D) the output of the layer before, as recorded
        if name == "tiny-qwen3-vl":  # DeepStack: that output gets its feature at the visual tokens before the
            d = entering.shape[1]  # layer reads it, which transformers records without: (N, 4D) features
            entering[image] += features[:, d * layer : d * (layer + 1)].to(entering.dtype)
        hidden = backend.decoder().norm(entering)  # (L, D) entering the layer, through the final norm
    embeds = stock.hidden_states[0][0]  # (L, D)
    attention = stock.attentions[RECORDED.get(name, layer - 1)][0]  # (H, L, L) at the scoring layer
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen[LLM_EMBEDS].float(), embeds[image].float(), **close)
    torch.testing.assert_close(seen[text_of(LLM_EMBEDS)].float(), embeds[text].float(), **close)
    torch.testing.assert_close(seen[LLM_HIDDEN].float(), hidden[image].float(), **close)
    torch.testing.assert_close(seen[text_of(LLM_HIDDEN)].float(), hidden[text].float(), **close)
    torch.testing.assert_close(seen[LLM_ATTENTION].float(), attention[:, text][:, :, image].float(), **close)
