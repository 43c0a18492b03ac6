"""Issue 27: on the Qwen ViTs, which have no [CLS] token, the "cls" signal is the attention each patch receives
(mean over heads and over the queries of its attention segment: the image, or a Qwen2.5-VL window), averaged
over a token's 2x2 patches. transformers computes those attention weights and drops them; an attention function
registered under a name of its own keeps them, and the signal must equal them, layer by layer."""

import pytest
import torch
from conftest import photo
from transformers import AttentionInterface
from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

import backends

KEPT: dict = {}  # attention module -> the weights of each segment it attended over, (1, heads, T, T) each


def keeping(module, query, key, value, attention_mask, **kwargs):
    """The eager attention, which also keeps its weights."""
    out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    KEPT.setdefault(module, []).append(weights)
    return out, weights


AttentionInterface.register("explorer-tests-keeping", keeping)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_the_received_attention_is_the_vits_own_softmax(name):
    backend = backends.load(name, "cpu")
    prepared = backend.prepare(photo(448, 336, seed=1), "What is in this picture?")
    blocks = backend.model.model.visual.blocks
    layers = (0, len(blocks) - 1)
    with torch.inference_mode():
        _, ours = backend.encode(prepared, tuple(f"cls@{layer}" for layer in layers))
        backend.model.set_attn_implementation("explorer-tests-keeping")
        KEPT.clear()
        backend.image_features(prepared)
    assert (len(KEPT[blocks[0].attn]) > 1) == (name == "tiny-qwen2.5-vl")  # Qwen2.5-VL's first block: windows
    for layer in layers:
        segments = KEPT[blocks[layer].attn]  # the image, or each window, in the order the blocks see the patches
        received = torch.cat([w[0].mean((0, 1)) for w in segments])  # (P,) mean over heads and queries
        tokens = backend.in_image_order(prepared, received[:, None]).mean(1)[:, 0]  # (N,) a token's 2x2 patches
        torch.testing.assert_close(ours[f"cls@{layer}"].float(), tokens.float(), rtol=1e-4, atol=1e-7)
