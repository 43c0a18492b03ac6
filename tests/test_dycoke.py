"""DyCoke against a reference written from the official code (github.com/KD-TAO/DyCoke at dd746349;
our code, not a copy): TTM keeps the official set on two clips at two merging ratios, on the tiny
LLaVA-OneVision and Qwen2-VL; each decode step attends to the official set, read from the layer before
the decode cut with eager attention; the layers from the cut on really attend over fewer cache entries,
which come back afterwards; the first decode step's logits are those of a rerun without a cache that
hides the left-out tokens from the new token in those layers alone; every budget is met on both
families; with the decode stage off the answer is stock generate()'s on the tokens TTM kept."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_video import write

import backends
from explorer import Budget, make, run
from explorer.core import FEATURES, Signals, fraction_of
from explorer.engine.llm import LlmStage
from explorer.engine.pipeline import select
from explorer.engine.video import load_video

PROMPT = "What happens in this video?"


@pytest.fixture(scope="module")
def onevision():
    return backends.load("tiny-llava-onevision", "cpu")


@pytest.fixture(scope="module")
def qwen2():
    return backends.load("tiny-qwen2-vl", "cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two clips: 8 frames of one video, 16 of a longer one."""
    folder = tmp_path_factory.mktemp("dycoke")
    return [
        load_video(write(folder / "a.mp4", "mpeg4", count=30), frames=8),
        load_video(write(folder / "b.mp4", "mpeg4", count=48), frames=16),
    ]


# --- TTM: llava/model/llava_arch.py, dycole_ttm, lines 35-91 ---------------------------------------------


def official_ttm(features: torch.Tensor, per_frame: int, k: float) -> torch.Tensor:
    """The indices (into the frames' tokens) of what the official TTM keeps, in its order. features:
    (F * per_frame, D), the clip's tokens before the newline (llava_arch.py 386-389 runs it there)."""
    frames = features.shape[0] // per_frame
    ratio = 1 - k  # line 38
    rows = torch.arange(frames * per_frame).view(frames, per_frame)
    x = features.view(frames, per_frame, -1)
    kept = [rows[f] for f in range(frames)]
    for i in range(0, frames - 1, 2):  # lines 41-65: pairs, on normalised features, least alike kept
        similarity = F.cosine_similarity(F.normalize(x[i], p=2, dim=1), F.normalize(x[i + 1], p=2, dim=1), dim=1)
        kept[i + 1] = rows[i + 1][similarity.topk(int(ratio * per_frame), largest=False).indices]
    for i in range(0, frames - 4, 4):  # lines 67-87: frame i + 2 against frame i, raw features
        similarity = F.cosine_similarity(x[i], x[i + 2], dim=1)
        kept[i + 2] = rows[i + 2][similarity.topk(int(ratio * per_frame), largest=False).indices]
    return torch.cat(kept[: frames - frames % 2])  # line 90: an unpaired last frame is not appended


@pytest.mark.parametrize("family", ["onevision", "qwen2"])
@pytest.mark.parametrize("k", [0.7, 0.5])  # 0.7: the lmms-eval model's default (lmms_eval/models/llava_onevision.py 92)
def test_ttm_keeps_the_official_set(request, clips, family, k):
    backend = request.getfixturevalue(family)
    for clip in clips:
        prepared = backend.prepare_video(clip.frames, PROMPT, clip.times_s)
        g = prepared.geometry
        with torch.inference_mode():
            features, maps = backend.encode(prepared, (FEATURES,))
        frames = torch.cat([g.members(p) for p in g.frames])  # (F * M,) in LLM order
        per_frame = len(g.members(g.frames[0]))
        official = frames[official_ttm(maps[FEATURES][frames].float().cpu(), per_frame, k)]
        newline = len(g) - len(frames)
        selection = make("dycoke").select_vision(Signals(g, len(official) + newline, maps))
        others = torch.tensor([i for i in range(len(g)) if i not in set(frames.tolist())], dtype=torch.long)
        assert selection.keep.tolist() == torch.cat([official, others]).sort().values.tolist()
        compared = len(g.frames) // 2 + len(range(0, len(g.frames) - 4, 4))
        assert len(official) == len(frames) - compared * (per_frame - int((1 - k) * per_frame))


# --- decode: llava/model/language_model/modeling_qwen2.py ------------------------------------------------


def official_step(attention: torch.Tensor, start: int, visual: int, framed: int, previous, threshold: float):
    """What the official decode step attends to, as (indices into the visual tokens, this step's image
    attention), or (None, ...) for everything. attention: (1, H, 1, S) the new token's attention at layer
    dycoke_l - 1 (line 1141 hands that layer's outputs on); visual: the visual tokens that entered, the
    `framed` frame tokens first (then LLaVA-OneVision's newline)."""
    span = framed - 1  # image_token_length: TTM's output less one (llava_arch.py 390)
    image = attention.mean(1)[0, -1][start : start + span]  # lines 98-101
    similarity = 0 if previous is None else F.cosine_similarity(image, previous, dim=0)  # lines 103-110
    if similarity >= threshold:  # line 113: only a step below the threshold cuts
        return None, image
    top = torch.topk(image, int(span * (1 - 0.8)), sorted=False)[1]  # lines 80-83, dycoke_p = 0.8
    rest = torch.arange(span, visual)  # lines 87-91: what follows the ranked span stays
    return torch.cat([top, rest]).sort().values, image


def decode(backend, clip, budget: float, tokens: int, **settings):
    """generate() on a clip under DyCoke's hooks, as the pipeline runs it, with every layer's attention:
    the output, the prompt, the visual tokens' first prompt position and count, and what each decode
    step attended to (indices into the visual tokens that entered, None: all)."""
    method = make("dycoke", **settings)
    selected = select(backend, clip, PROMPT, method, Budget(fraction=budget), tokens)
    prepared, keep = selected.prepared, selected.selection.keep
    stage = LlmStage("dycoke", method, prepared.geometry, selected.budget, backend.depth, selected.selection)
    ids = prepared.inputs["input_ids"][:, backend.staying(prepared, keep)]
    short = dataclasses.replace(prepared, inputs={**prepared.inputs, "input_ids": ids})
    chosen = []

    def attend(maps, alive):
        chosen.append(stage.attend(maps, alive))
        return chosen[-1]

    inputs = backend.generate_inputs(prepared, selected.features, keep)
    options = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, return_dict_in_generate=True)
    options |= dict(output_logits=True, output_attentions=True, pad_token_id=backend.tokenizer.pad_token_id)
    with (
        torch.inference_mode(),
        backend.pruning(short, stage.pairs, (), stage.choose, True, attend=attend if method.decode_keep else None),
    ):
        out = backend.model.generate(**inputs, **options)
    start = int((ids[0] == backend.visual_token_id(prepared)).nonzero()[0, 0])
    g = prepared.geometry
    framed = int(torch.isin(g.partition[keep], torch.tensor(g.frames)).sum())
    return out, inputs, start, (len(keep), framed), chosen


@pytest.fixture
def eager(request):
    """The backend with eager attention while the test runs (it gives every layer's attention)."""
    backend = request.getfixturevalue(request.param)
    backend.model.set_attn_implementation("eager")
    yield backend
    backend.model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("eager", ["onevision", "qwen2"], indirect=True)
@pytest.mark.parametrize("threshold", [0.9, 1.0])  # 0.9: the official; 1.0: every step whose attention moved cuts
def test_each_decode_step_attends_to_the_official_set_over_fewer_cache_entries(eager, clips, threshold):
    out, inputs, start, (visual, framed), chosen = decode(eager, clips[0], 0.25, 4, threshold=threshold)
    prompt, previous = inputs["input_ids"].shape[1], None
    assert len(chosen) == 3 and chosen[0] is not None  # the first decode step always cuts
    for step, attended in enumerate(chosen, start=1):
        want, previous = official_step(out.attentions[step][2], start, visual, framed, previous, threshold)
        assert (attended is None and want is None) or attended.tolist() == want.tolist()
        entries = prompt + step - (0 if want is None else visual - len(want))
        widths = [a.shape[-1] for a in out.attentions[step]]  # the keys each layer's new token attended to
        assert widths == [prompt + step] * 3 + [entries] * (eager.depth - 3)  # layers 3 on attend to fewer
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [prompt + 3] * eager.depth  # all back


def test_the_cut_hides_only_the_left_out_tokens_from_the_layers_after_it(onevision, clips):
    """The first decode step's logits are a rerun's without a cache on the prompt and the first token,
    whose mask hides, in layers 3 on, the left-out visual tokens from that token alone; without the
    decode stage they are the rerun's with nothing hidden, and the two differ."""
    cut, _, start, (visual, _), chosen = decode(onevision, clips[0], 0.25, 2)
    whole, inputs, *_ = decode(onevision, clips[0], 0.25, 2, decode_pruning=False)
    assert torch.equal(cut.logits[0], whole.logits[0])  # the prefill is the same
    left_out = start + torch.tensor(sorted(set(range(visual)) - set(chosen[0].tolist())))
    ids = torch.cat([inputs["input_ids"], cut.sequences[:, -2:-1]], 1)  # the prompt and the first new token
    rerun = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for hidden, want in [(left_out, cut.logits[1]), (left_out[:0], whole.logits[1])]:
        logits = hiding(onevision, rerun, hidden, from_layer=3)
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cut.logits[1], whole.logits[1])


def hiding(backend, inputs: dict, hidden: torch.Tensor, from_layer: int) -> torch.Tensor:
    """The last position's logits of a pass without a cache whose causal mask also hides the prompt
    positions `hidden` from the last token in the layers from `from_layer` on."""
    length = inputs["input_ids"].shape[1]
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]  # (1, 1, L, L)
    masked = causal.clone()
    masked[..., -1, hidden] = torch.finfo(torch.float32).min

    def masking(layer):
        return lambda module, args, kwargs: (
            args,
            {**kwargs, "attention_mask": masked if layer >= from_layer else causal},
        )

    layers = backend.decoder().layers
    handles = [block.register_forward_pre_hook(masking(i), with_kwargs=True) for i, block in enumerate(layers)]
    try:
        with torch.inference_mode():
            return backend.model(**inputs, use_cache=False).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", ["onevision", "qwen2"])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_every_budget_is_met_on_both_families(request, clips, family, budget):
    backend = request.getfixturevalue(family)
    result = run(backend, clips[0], PROMPT, "dycoke", budget, max_new_tokens=3, min_new_tokens=3)
    t, g = result.tokens, result.geometry
    b = fraction_of(budget, len(g))
    assert t["visual_kept"] == len(result.selection.keep) == b == t["visual_layer_mean"]
    assert t["visual_per_layer"] == [b] * backend.depth and sum(f["kept"] for f in t["by_frame"]) <= b
    assert sum(result.selection.budgets.values()) == b - (len(g) - sum(len(g.members(p)) for p in g.frames))
    steps = t["visual_attended_per_step"]
    assert len(steps) == 2 and steps[0] < b and all(s <= b for s in steps)


def test_with_the_decode_stage_off_the_answer_is_stock_generate_on_what_ttm_kept(onevision, clips):
    result = run(onevision, clips[0], PROMPT, "dycoke", 0.5, settings={"decode_pruning": False}, max_new_tokens=5)
    selected = select(onevision, clips[0], PROMPT, make("dycoke"), Budget(fraction=0.5), 5)
    inputs = onevision.generate_inputs(selected.prepared, selected.features, selected.selection.keep)
    with torch.inference_mode():
        stock = onevision.model.generate(**inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert list(result.answer_ids) == stock[0, inputs["input_ids"].shape[1] :].tolist()
    assert "visual_attended_per_step" not in result.tokens
