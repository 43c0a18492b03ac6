"""The official code's kept set, computed by a reference written from each official repository (file
and line cited; our code, not a copy), on the same signals the hooks give our method, on a 32-layer
tiny LLaVA-NeXT: SparseVLM, PyramidDrop, FastV and DART, in their official settings, keep exactly
the official set at every cut, on a square image and two non-square ones, at two budgets each."""

import contextlib
import copy

import pytest
import torch
import transformers
from conftest import photo

from backends.llava_next import LlavaNext
from explorer import Budget, make, run
from explorer.engine.llm import LlmStage

PROMPT = "What is shown in this image?"
IMAGES = [(336, 336), (640, 480), (400, 700)]  # a square image and two non-square ones


@pytest.fixture(scope="module")
def deep(backend):
    """The tiny LLaVA-NeXT (LLaVA-1.6-7B's 32 LLM layers, so that the official layers exist) with 16 heads a
    layer (LLaVA-7B has 32), so that SparseVLM's 14 heads exist."""
    config = copy.deepcopy(backend.model.config)
    text = config.text_config
    assert text.num_hidden_layers == 32
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 16, 16, 8
    torch.manual_seed(2)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    return LlavaNext(model, backend.processor, "tiny-llava-next, 32 layers", random_weights=True)


class Enough(Exception):
    """Raised once the last cut has chosen: nothing the layers after it compute is read."""


def captured(backend, image, name: str, budget_of, **settings) -> list[tuple[dict, torch.Tensor, int, torch.Tensor]]:
    """One prefill with the method's hooks, stopped after the last cut: per cut, the signals it read (with the
    visual and text tokens' prompt positions), the tokens alive, the count it had to keep and what it kept
    (indices into N). `budget_of(n)` gives the budget for n visual tokens."""
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, _ = backend.encode(prepared, ())
    inputs = backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
    method = make(name, **settings)
    stage = LlmStage(name, method, prepared.geometry, budget_of(len(prepared.geometry)), backend.depth)
    seen = []

    ids = prepared.inputs["input_ids"][0]
    image = (ids == backend.image_token_id).nonzero()[:, 0]  # (N,) prompt positions
    where = {"positions": image, "text positions": torch.arange(int(image.max()) + 1, len(ids))}

    def choose(cut, maps, alive):
        keep = stage.choose(cut, maps, alive)
        seen.append((maps | where, alive, stage.cuts[cut].tokens, keep))
        if len(seen) == len(stage.cuts):
            raise Enough
        return keep

    with torch.no_grad(), backend.pruning(prepared, stage.pairs, method.needs, choose, method.keep_positions):
        with contextlib.suppress(Enough):
            backend.model(**inputs)
    assert len(seen) == len(stage.cuts)
    return seen


# --- FastV: github.com/pkunlp-icler/FastV at d1659729 -------------------------------------------------


def official_fastv(attention: torch.Tensor, alive: torch.Tensor, rank: int) -> torch.Tensor:
    """src/transformers/src/transformers/models/llama/modeling_llama.py L738-750 (inplace; the mask mode,
    L775-787, picks the same): the previous layer's attention, averaged over the heads (L740), its last row
    (L742), the image tokens' span (L744; the span starts at the image here, where the scripts' sys length
    of 36 is one past it, FastV issue #16), topk(ATTENTION_RANK) (L746), sorted (L750)."""
    row = attention.mean(0)[-1]  # (N,) heads averaged, the last token's row
    image = alive.nonzero()[:, 0]  # every image token is there at the one cut
    return image[row[image].topk(rank).indices].sort().values


@pytest.mark.parametrize("size", IMAGES)
@pytest.mark.parametrize("share", [2, 4])  # R: half the image (the paper's 50%), a quarter
def test_fastv_keeps_the_official_set(deep, size, share):
    settings = dict(layer=2, budget_after_cuts=True)  # the scripts pass the kept count R, K = 2
    ((maps, alive, rank, keep),) = captured(deep, photo(*size, seed=size[0]), "fastv", lambda n: n // share, **settings)
    assert rank == len(alive) // share
    assert torch.equal(keep, official_fastv(maps["llm-attention"], alive, rank))


# --- PyramidDrop: github.com/Cooperx521/PyramidDrop at 6444f304 ---------------------------------------


def official_pdrop_counts(n: int, ratios: list[float]) -> list[int]:
    """llava/eval/model_vqa_loader.py L94-96 prepends 1.0 to the script's ratio list; the kept counts are
    int(N * ratio) (llava/model/modeling_llama_pdrop.py L1306-1307)."""
    return [int(n * r) for r in [1.0, *ratios]][1:]


def official_pdrop(attention: torch.Tensor, alive: torch.Tensor, keep_length: int) -> torch.Tensor:
    """llava/model/modeling_llama_pdrop.py L1389-1407: the last instruction token's attention (L1390-1392),
    softmax over the whole sequence (L1395-1397), averaged over the heads (L1399), the image span (L1400),
    topk(keep_length) (L1405), sorted (L1407)."""
    row = attention[:, -1].mean(0)  # (N,) NaN where cut before
    image = alive.nonzero()[:, 0]  # the image tokens still in the sequence, in order
    return image[row[image].topk(keep_length).indices].sort().values


@pytest.mark.parametrize("size", IMAGES)
@pytest.mark.parametrize("ratio", [0.5, 0.25])  # the scripts' [0.5, 0.25, 0.125]; and lambda = 1/4
def test_pdrop_keeps_the_official_set_at_each_stage(deep, size, ratio):
    ratios = [ratio, ratio**2, ratio**3]  # --layer_list '[8,16,24]' in every script (scripts/v1_6/pdrop_eval)
    settings = dict(stages=3, ratio=ratio, budget_after_cuts=True)  # the last stage keeps int(N ratio^3)
    seen = captured(deep, photo(*size, seed=size[1]), "pdrop", lambda n: int(n * ratios[-1]), **settings)
    n = len(seen[0][1])
    assert [count for _, _, count, _ in seen] == official_pdrop_counts(n, ratios)
    for maps, alive, count, keep in seen:
        assert torch.equal(keep, official_pdrop(maps["llm-attention"], alive, count))


# --- SparseVLM v2.0: github.com/Gumpest/SparseVLMs at 26a5f488 (USE_VERSION=2_0) ------------------------
# files under llava/model/language_model/


def official_rope_map(backend, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """modelling_sparse_llama.py L243-250: all-ones queries and keys (L246-247) through the model's RoPE at
    the tokens' position ids (L248-249; v2.0 keeps the original ones, L311-312), q.k^T / sqrt(head_dim)
    (L250), for the query positions `rows` and the key positions `columns`."""
    lm = backend.model.model.language_model
    d = lm.config.head_dim
    positions = torch.cat([rows, columns])[None]
    ones = torch.ones(1, 1, positions.shape[1], d)
    cos, sin = lm.rotary_emb(ones, positions)
    q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(ones, ones, cos, sin)
    return (q[0, 0, : len(rows)] @ k[0, 0, len(rows) :].T) / d**0.5  # (T, V)


def official_sparsevlm(backend, maps: dict, alive: torch.Tensor, count: int, heads: int = 14) -> torch.Tensor:
    """Raters: modelling_sparse_llama.py L199-204, on the layer-0 inputs: softmax over the text of V T^T,
    averaged over the visual tokens, strictly above its mean. At a pruning layer: its attention (L239)
    divided by the RoPE map (L251), the `heads` heads giving the raters' rows on the image span the most
    (score.py L48-55, topk(14)), averaged (score.py L27), the raters' rows on the image (L29-30)
    averaged (L32), topk(min(count, V - 1)) (L41); the policy keeps them in order (L309-310)."""
    relevance = (maps["llm-embeds"] @ maps["llm-text-embeds"].T).softmax(1).mean(0)  # (T,)
    raters = torch.where(relevance > relevance.mean())[0]
    image = alive.nonzero()[:, 0]  # the visual span now: the tokens still there, in order
    rope = official_rope_map(backend, maps["text positions"], maps["positions"][image])  # (T, V)
    corrected = maps["llm-attention"][:, :, image] / rope  # (H, T, V)
    on_image = corrected[:, raters]  # (H, R, V)
    chosen = on_image.sum((1, 2)).topk(heads).indices
    relation = on_image[chosen].mean(0).mean(0)  # (V,)
    return image[relation.topk(min(count, len(image) - 1)).indices].sort().values


@pytest.mark.parametrize("size", IMAGES)
@pytest.mark.parametrize("paper", [192, 64])  # of 576: the paper's budgets, as a share of the image's tokens
def test_sparsevlm_keeps_the_official_set_at_each_stage(deep, size, paper):
    seen = captured(deep, photo(*size, seed=size[0] + 1), "sparsevlm", lambda n: n * paper // 576)  # v2.0 defaults
    assert len(seen) == 3
    for maps, alive, count, keep in seen:
        assert torch.equal(keep, official_sparsevlm(deep, maps, alive, count))


# --- DART: the authors' commits in github.com/xqy1111111/DART up to 5a19452f --------------------------


def official_dart(maps: dict, max_num_trunction: int, image_pivots: int = 4, text_pivots: int = 4) -> torch.Tensor:
    """llava/model/language_model/modeling_llama_self.py L397-449, in the prompt's positions: each pivot
    takes floor(max_num_trunction / 8) (L409); L1 norms of the layer K-1 keys (L419-425); the top image
    and text tokens by norm (L427-428) in a Python set (L429); candidates the image tokens but the image
    pivots (L431-433); pivot by pivot in the set's order (L434), the candidates least cosine-similar on the
    final-normed hidden states (L435-437) join the set and leave the candidates (L439-443); the text pivots
    leave the set (L445)."""
    top_k = max_num_trunction // (image_pivots + text_pivots)
    image, text = maps["positions"].tolist(), maps["text positions"].tolist()
    state = dict(zip(image + text, torch.cat([maps["llm-hidden"], maps["llm-text-hidden"]])))
    image_indices = [image[i] for i in maps["llm-keys"].norm(p=1, dim=-1).topk(image_pivots).indices]
    query_indices = [text[i] for i in maps["llm-text-keys"].norm(p=1, dim=-1).topk(text_pivots).indices]
    indices_set = set(image_indices + query_indices)
    valid_indices = set(image) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = torch.stack([state[i] for i in valid_indices_list])
        cos_sim = -torch.nn.functional.cosine_similarity(state[item], valid_vectors, dim=-1)
        top_k_real_indices = [valid_indices_list[i] for i in cos_sim.topk(top_k).indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(sorted(image.index(p) for p in indices_set))


@pytest.mark.parametrize("size", IMAGES)
@pytest.mark.parametrize("share", [9, 4])  # max_num_trunction: the scripts' 128 of 576, and a quarter
def test_dart_keeps_the_official_set(deep, size, share):
    """Its official setting: the official pivot order, and R = 4 + 8 floor(M / 8) for the official M."""
    settings = dict(official_order=True, budget_after_cuts=True)
    image = photo(*size, seed=size[1] + 1)
    ((maps, alive, count, keep),) = captured(deep, image, "dart", lambda n: 4 + 8 * (n // share // 8), **settings)
    official = official_dart(maps, len(alive) // share)
    assert len(official) == count and torch.equal(keep, official)


# --- FastV's accuracy mode: no KV cache, the image ranked again for every generated token ------------


@pytest.fixture(scope="module")
def eager(backend):
    """The tiny model's first two LLM layers, same weights, with eager attention, which returns attention
    maps: layer 1's maps (the only ones read) depend on layers 0 and 1 alone, and the 30 layers after them
    would only add time and memory (every layer's L x L maps)."""
    model = copy.deepcopy(backend.model)
    model.model.language_model.layers = model.model.language_model.layers[:2]
    model.config.text_config.num_hidden_layers = 2  # this copy's own config: the loop runs over its 2 layers
    model.set_attn_implementation("eager")
    return model


def test_fastv_rerank_chooses_again_for_every_token_as_the_mask_mode_without_a_cache(backend, eager):
    """Each generated token is the one a pass over the prompt and the answer so far gives when the image
    tokens left from layer K on are the top R by that pass's last token's attention at layer K-1, heads
    averaged (modeling_llama.py L773-792, every pass of a generate() without a cache), read here from the
    eager model's own attention maps."""
    from explorer.engine.fidelity import logprobs

    image, settings = photo(640, 480, seed=8), {"rerank": True, "budget_after_cuts": True}
    result = run(
        backend, image, PROMPT, "fastv", Budget(tokens=585), settings=settings, max_new_tokens=4, min_new_tokens=4
    )
    answer = torch.tensor(result.answer_ids)
    prepared = backend.prepare(image, PROMPT)
    with torch.no_grad():
        features, _ = backend.encode(prepared, ())
    inputs = backend.generate_inputs(prepared, features, torch.arange(len(prepared.geometry)))
    image_positions = (inputs["input_ids"][0] == backend.image_token_id).nonzero()[:, 0]
    chosen = []
    for t in range(len(answer)):
        ids = torch.cat([inputs["input_ids"], answer[None, :t]], 1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            maps = eager(
                input_ids=ids,
                attention_mask=mask,
                mm_encoder_outputs=inputs["mm_encoder_outputs"],
                output_attentions=True,
            ).attentions
        row = maps[1][0, :, -1, image_positions].mean(0)  # layer K - 1 = 1, the newest token's row
        keep = row.topk(585).indices.sort().values
        chosen.append(tuple(keep.tolist()))
        replay = backend.pruning(prepared, [(2, 1)], (), lambda cut, maps, alive, keep=keep: keep, True)
        with torch.no_grad(), replay:
            logits = backend.model(
                input_ids=ids, attention_mask=mask, mm_encoder_outputs=inputs["mm_encoder_outputs"], use_cache=False
            ).logits
        assert logits[0, -1].argmax() == answer[t]
    assert len(set(chosen)) > 1  # the tokens were chosen again, differently
    assert result.selection.keep.tolist() == list(chosen[-1])  # the result shows the last pass's choice
    mine = logprobs(backend, image, PROMPT, result.answer_ids, "fastv", Budget(tokens=585), settings)
    assert mine.argmax(-1).tolist() == list(result.answer_ids)  # teacher forcing chooses again at every token too


def test_fastv_rerank_keeping_every_token_is_the_unreduced_model(backend):
    image = photo(336, 336, seed=9)
    full = run(backend, image, PROMPT, "none", max_new_tokens=6)
    assert (
        run(backend, image, PROMPT, "fastv", 1.0, settings={"rerank": True}, max_new_tokens=6).answer_ids
        == full.answer_ids
    )
