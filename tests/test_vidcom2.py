"""VidCom2 against its official code: on clips decoded from files, the tiny LLaVA-OneVision and Qwen2-VL keep
exactly the tokens the official code keeps, at 25% and 10%, given the official code's count; at a fraction
budget the count is floor(r * N) on every video family and `by_frame` adds up.

The reference below is our own reading of xuyang-liu16/VidCom2 at 944a17d, token_compressor/vidcom2/vidcom2.py,
with the lines it follows; none is a copy. The code runs on the projected frame tokens: LLaVA-OneVision's
pooled features before the newline is appended (token_compressor/vidcom2/models/llava.py lines 152-168, the
"one_token" branch), Qwen2-VL's merger output with a temporal group's (h/2)(w/2) tokens a frame
(token_compressor/vidcom2/models/qwen2_vl.py lines 32-43).
"""

import pytest
import torch
import torch.nn.functional as F
from test_video import write

import backends
from explorer import Budget, ExplorerError, Signals, make, run
from explorer.core import FEATURES
from explorer.engine.video import load_video
from explorer.methods import unavailable

PROMPT = "What happens in this video?"
FAMILIES = ["tiny-llava-onevision", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm"]  # video
CLIPS = {"mpeg4": ("clip.mp4", 30, 4), "libx264": ("clip.mkv", 24, 6)}  # codec: (file, frames written, decoded)
MODELS = {"tiny-llava-onevision": 1, "tiny-qwen2-vl": 4}  # times the frames decoded: Qwen's are 6 tokens a group


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    return {codec: write(folder / file, codec, count=n) for codec, (file, n, _) in CLIPS.items()}


@pytest.fixture(scope="module")
def clips(files):
    return {codec: load_video(files[codec], frames=CLIPS[codec][2]) for codec in CLIPS}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param, backends.load(request.param, "cpu")


def official(flat: torch.Tensor, per_frame: int, base: float) -> tuple[torch.Tensor, list[int]]:
    """The official selection on the (T * M, D) frame tokens: the kept rows and each frame's count."""
    variance = flat.var(dim=0, unbiased=False)  # select_low_var_channels, lines 38-43
    x = flat[:, torch.topk(variance, k=int(flat.shape[-1] * 0.5), largest=False).indices]
    frames = F.normalize(x.view(-1, per_frame, x.shape[-1]), dim=-1)  # compute_gaussian_scores, lines 45-57

    def gaussian(centre):  # _multi_scale_gaussian, lines 59-62, alphas 2^-3 .. 2^1 (line 54)
        distance = ((frames - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-distance / (2 * a)) for a in [2**k for k in range(-3, 2)])

    video, frame = gaussian(frames.mean(dim=(0, 1), keepdim=True)), gaussian(frames.mean(dim=1, keepdim=True))
    scores = -video.mean(dim=-1)  # vidcom2_compression line 32
    probs = F.softmax((scores - scores.max()) / 0.01, dim=0)  # compute_scales, lines 64-68
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    ks = (scales * per_frame).round().long().clamp(min=1).tolist()  # select_outlier_indices, lines 70-78
    combined = video + frame
    kept = [torch.topk(combined[i], k=k, largest=False).indices.sort().values + i * per_frame for i, k in enumerate(ks)]
    return torch.cat(kept), ks  # _map_linear_offset, lines 99-103


def signals(backend, clip) -> tuple[Signals, torch.Tensor]:
    prepared = backend.prepare_video(clip.frames, PROMPT, clip.times_s)
    with torch.no_grad():
        _, maps = backend.encode(prepared, (FEATURES,))
    return Signals(prepared.geometry, 0, maps), maps[FEATURES]


@pytest.mark.parametrize("codec", list(CLIPS))
@pytest.mark.parametrize("base", [0.25, 0.1])
def test_the_kept_tokens_are_the_official_code_s(model, files, codec, base):
    name, backend = model
    s, features = signals(backend, load_video(files[codec], frames=CLIPS[codec][2] * MODELS[name]))
    g = s.geometry
    frames = torch.cat([g.members(p) for p in g.frames])  # (T * M,) in LLM order: the official code's rows
    newline = [i for i in range(len(g)) if i not in set(frames.tolist())]  # appended after compression
    rows, ks = official(features[frames].float(), len(g.members(g.frames[0])), base)
    chosen = make("vidcom2").select(Signals(g, len(rows) + len(newline), s.maps))
    assert chosen.keep.tolist() == sorted(frames[rows].tolist() + newline)
    assert [chosen.budgets[g.names[p]] for p in g.frames] == ks
    assert len(set(ks)) > 1 or (base == 0.1 and "qwen" in name)  # the frames' uniqueness set different shares


@pytest.mark.parametrize("budget", [0.25, 0.1])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_meets_the_budget_and_by_frame_adds_up(files, clips, name, budget):
    clip = load_video(files["mpeg4"], frames=8) if "qwen" in name else clips["mpeg4"]  # Qwen: 4 groups of 2 frames
    result = run(backends.load(name, "cpu"), clip, PROMPT, "vidcom2", budget, max_new_tokens=1)
    t, n = result.tokens, len(result.geometry)
    assert t["visual_full"] == n and t["visual_kept"] == Budget(budget).resolve(n) == len(result.selection.keep)
    assert sum(f["full"] for f in t["by_frame"]) == n and sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"]
    assert sum(result.selection.budgets.values()) == t["visual_kept"]
    unique = result.selection.maps["frame uniqueness"]
    assert unique.isnan().sum() == n - sum(len(result.geometry.members(p)) for p in result.geometry.frames)


def test_a_budget_past_the_frames_caps_then_keeps_the_newline(clips):
    s, _ = signals(backends.load("tiny-llava-onevision", "cpu"), clips["mpeg4"])
    n = len(s.geometry)
    assert make("vidcom2").select(Signals(s.geometry, n, s.maps)).keep.tolist() == list(range(n))
    few = make("vidcom2").select(Signals(s.geometry, 3, s.maps))  # fewer than the 4 frames: no newline
    assert len(few.keep) == 3 and few.budgets["newline"] == 0


def test_an_image_is_refused_with_the_reason(clips):
    onevision = backends.load("tiny-llava-onevision", "cpu")
    assert "runs on clips" in unavailable("vidcom2", onevision, clip=False)
    with pytest.raises(ExplorerError, match="give it a clip"):
        run(onevision, clips["mpeg4"].frames[0], PROMPT, "vidcom2", Budget(0.25), max_new_tokens=1)
