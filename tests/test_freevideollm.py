"""Free Video-LLM: the prompt-frame and prompt-patch similarities and the frame and region rule re-derived from
the official code (contrastive/FreeVideoLLM @ 1d62394), the budget met on a clip of both video families, and
the message when its CLIP model cannot be had. A tiny random-weight CLIP model stands in for
openai/clip-vit-large-patch14-336: its 56-px tower has a 14 x 14 patch grid, OneVision's grid of a frame."""

import dataclasses
import math

import pytest
import torch
import transformers
from PIL import Image
from test_video import write
from tokenizers import processors

import backends
from backends.random_models import CORPUS, build_tokenizer
from explorer import ExplorerError, run
from explorer.core import Budget, fraction_of
from explorer.engine.video import Clip, load_video

PROMPT = "What happens in this video?"


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    """A tiny random-weight CLIP model in a folder: a tokenizer that opens and closes the text as CLIP's
    does (the text is pooled at its end token), both towers with their projections, CLIP's processor."""
    folder = tmp_path_factory.mktemp("clip")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>"], CORPUS + " " + PROMPT, **specials)
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    around = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    tokenizer.backend_tokenizer.post_processor = around
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, **sizes)
    config = transformers.CLIPConfig(text_config=text, vision_config=dict(image_size=56, patch_size=4, **sizes))
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    square = {"shortest_edge": 56}, {"height": 56, "width": 56}
    transformers.CLIPImageProcessor(size=square[0], crop_size=square[1]).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def onevision():
    return backends.load("tiny-llava-onevision", "cpu")


@pytest.fixture(scope="module")
def qwen():
    return backends.load("tiny-qwen2-vl", "cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list:
    """Two clips of 4 frames: 30 and 17 drawn frames sampled to 4."""
    folder = tmp_path_factory.mktemp("videos")
    return [load_video(write(folder / f"clip{n}.mp4", "mpeg4", count=n), frames=4) for n in (30, 17)]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Clip:
    """8 frames at 224 x 112: Qwen2-VL's temporal groups of 2 frames on a 4 x 8 grid each."""
    clip = load_video(write(tmp_path_factory.mktemp("wide") / "clip.mp4", "mpeg4", count=30), frames=8)
    return dataclasses.replace(clip, frames=[frame.resize((224, 112)) for frame in clip.frames])


@pytest.fixture(scope="module")
def official(clips, clip_model) -> list:
    """The official code's similarities on each of the two clips."""
    return [official_similarity(clip_model, clip.frames, PROMPT) for clip in clips]


def official_similarity(folder: str, frames: list, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F,) prompt-frame and (F, 14, 14) prompt-patch cosines as the official code computes them."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)  # clip_encoder.py L23-24
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    side = processor.size["shortest_edge"]  # mm_utils.py L178-185: image_aspect_ratio "resize" squashes each frame
    images = processor([frame.resize((side, side)) for frame in frames], return_tensors="pt")["pixel_values"]
    input_ids = tokenizer(question, padding=True, return_tensors="pt")["input_ids"]  # clip_encoder.py L31-32
    with torch.no_grad():
        # clip_encoder.py L33-34 (transformers 5 returns the output: its pooler_output is what 4.x returned)
        text_pooled = model.get_text_features(input_ids).pooler_output
        image_pooled = model.get_image_features(images).pooler_output
        cos = torch.nn.functional.cosine_similarity(text_pooled, image_pooled, dim=-1)  # llava_arch.py L234
        outputs = model(input_ids, images)  # clip_encoder.py L41-43, then llava_arch.py L250-251
        fine = model.visual_projection(outputs.vision_model_output.last_hidden_state[:, 1:])
        patch = torch.nn.functional.cosine_similarity(outputs.text_embeds, fine, dim=-1)  # llava_arch.py L259
    return cos, patch.unflatten(1, (14, 14))


def official_keep(cos: torch.Tensor, patch: torch.Tensor, frames: int, roi_ratio: float) -> torch.Tensor:
    """The tokens of a 4 x 196 + 1 OneVision clip that the official rule keeps: the `frames` frames most
    like the prompt (llava_arch.py L232-238), each cropped to its region (L259-267, roi_box L148-165)."""
    _, sorted_idxs = torch.sort(cos, dim=-1)
    textguided_idx = sorted_idxs[-frames:].to(torch.int32).sort()[0].tolist()
    h, w = 14, 14
    _, top_idxs = torch.topk(patch[textguided_idx].flatten(1), int(h * w * roi_ratio), dim=1, sorted=False)
    x_mean = (top_idxs % w).float().mean(dim=-1).to(torch.int32)
    y_mean = (top_idxs // w).float().mean(dim=-1).to(torch.int32)
    h_new, w_new = round(h * math.sqrt(roi_ratio)), round(w * math.sqrt(roi_ratio))
    kept = []
    for i, frame in enumerate(textguided_idx):
        left, right = int(x_mean[i]) - w_new // 2, int(x_mean[i]) + w_new - w_new // 2
        top, bottom = int(y_mean[i]) - h_new // 2, int(y_mean[i]) + h_new - h_new // 2
        if left < 0:
            left, right = 0, w_new
        if right > w:
            left, right = w - w_new, w
        if top < 0:
            top, bottom = 0, h_new
        if bottom > h:
            top, bottom = h - h_new, h
        kept += [frame * 196 + r * w + c for r in range(top, bottom) for c in range(left, right)]
    return torch.tensor(sorted(kept))


@pytest.mark.parametrize("roi_ratio", [0.8, 0.5])
def test_the_kept_tokens_are_the_official_frames_and_regions(onevision, clips, official, clip_model, roi_ratio):
    """On OneVision, whose frame grid is the tiny CLIP's patch grid, a budget of whole regions keeps the official
    code's tokens, on two clips and two budgets (one and two frames), and the signals are its cosines."""
    settings = {"text_encoder": clip_model, "roi_ratio": roi_ratio}
    side = round(14 * math.sqrt(roi_ratio))
    for clip, (cos, patch) in zip(clips, official):
        for frames in (1, 2):
            budget = Budget(tokens=frames * side * side)
            result = run(onevision, clip, PROMPT, "free-video-llm", budget, settings=settings, max_new_tokens=1)
            assert torch.equal(result.selection.keep, official_keep(cos, patch, frames, roi_ratio))
        maps = result.selection.maps
        torch.testing.assert_close(maps["prompt-frame similarity"][:-1], cos.repeat_interleave(196))
        torch.testing.assert_close(result.selection.scores[:-1], patch.flatten())
        assert maps["prompt-frame similarity"][-1].isnan() and result.selection.scores[-1].isnan()  # the newline


@pytest.mark.parametrize("family, video", [("onevision", "clips"), ("qwen", "wide")])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_the_budget_is_met_on_both_video_families(request, family, video, budget, clip_model):
    """Frames of 14 x 14 tokens (OneVision, 4 frames), temporal groups of 4 x 8 (Qwen2-VL, 8 frames)."""
    backend, clip, settings = (
        request.getfixturevalue(family),
        request.getfixturevalue(video),
        {"text_encoder": clip_model},
    )
    clip = clip[0] if isinstance(clip, list) else clip
    result = run(backend, clip, PROMPT, "free-video-llm", budget, settings=settings, max_new_tokens=1)
    t, g, selection = result.tokens, result.geometry, result.selection
    assert t["visual_kept"] == fraction_of(budget, t["visual_full"]) == len(selection.keep)
    assert sum(selection.budgets.values()) == t["visual_kept"] == sum(f["kept"] for f in t["by_frame"])
    frame = selection.maps["prompt-frame similarity"]
    alike = [float(frame[g.members(p)[0]]) for p in g.frames]
    counts = [selection.budgets[g.names[p]] for p in g.frames]
    ranked = sorted(range(len(alike)), key=lambda i: -alike[i])
    assert [counts[i] for i in ranked] == sorted(counts, reverse=True)  # the frames most like the prompt first
    assert counts[ranked[-1]] < max(counts)  # and not every frame: the budget is below every region


def test_a_budget_past_every_region_takes_the_tokens_most_like_the_prompt(onevision, clips, clip_model):
    settings = {"text_encoder": clip_model}
    result = run(onevision, clips[0], PROMPT, "free-video-llm", 0.9, settings=settings, max_new_tokens=1)
    selection, n = result.selection, 4 * 196 + 1
    assert len(selection.keep) == fraction_of(0.9, n)
    inside = selection.maps["prompt region"] == 1
    assert int(inside.sum()) == 4 * 13 * 13 and inside[selection.keep].sum() == inside.sum()  # every region
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[selection.keep] = False
    beyond = selection.keep[~inside[selection.keep]]
    assert selection.scores[beyond].min() >= selection.scores[dropped].nan_to_num(-math.inf).max()


def test_without_its_clip_model_it_says_which_and_how_to_get_it(onevision, clips):
    """The tests run with HF_HUB_OFFLINE set and an empty cache: the official CLIP model cannot be had."""
    with pytest.raises(ExplorerError, match=r"openai/clip-vit-large-patch14-336.*hf download.*text_encoder"):
        run(onevision, clips[0], PROMPT, "free-video-llm", 0.25, max_new_tokens=1)
    with pytest.raises(ExplorerError, match="give it a clip"):
        run(onevision, Image.new("RGB", (64, 32)), PROMPT, "free-video-llm", 0.25, max_new_tokens=1)


def test_a_temporal_group_has_the_mean_of_its_frames_similarities(qwen, wide, clip_model):
    """Qwen2-VL folds frames 2i and 2i+1 into one group of 4 x 8 tokens: they carry the mean of the two frames'
    official cosines."""
    settings = {"text_encoder": clip_model}
    result = run(qwen, wide, PROMPT, "free-video-llm", 0.25, settings=settings, max_new_tokens=1)
    g, selection = result.geometry, result.selection
    cos, _ = official_similarity(clip_model, wide.frames, PROMPT)
    frame = selection.maps["prompt-frame similarity"]
    torch.testing.assert_close(frame, cos.view(4, 2).mean(1).repeat_interleave(32))
    assert [g.grid(p) for p in g.frames] == [(4, 8)] * 4 and not selection.scores.isnan().any()


def test_the_live_preview_waits_for_run_since_the_prompt_picks_the_frames(onevision, clips, clip_model):
    from explorer.views.clip import clip_pass
    from explorer.views.preview import VisionCache, preview

    cache = VisionCache(images=1, entries=4, compute=clip_pass)  # as the app's video mode holds clips
    seen = preview(onevision, clips[0], "free-video-llm", 0.25, {"text_encoder": clip_model}, cache, "clip")
    assert seen.pending and len(seen.selection.keep) == len(seen.geometry)  # every token until Run
    assert "a CLIP model beside the VLM reads at Run" in seen.note
    assert not preview(onevision, clips[0], "evs", 0.25, None, cache, "clip").pending  # no prompt read: at once
