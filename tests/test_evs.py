"""EVS against vLLM's code: on clips decoded from files, the tiny LLaVA-OneVision and Qwen2-VL keep exactly the
tokens vLLM's `compute_retention_mask` keeps, at pruning rates 0.75 and 0.9 (25% and 10% kept), given vLLM's
count; at a fraction budget the count is floor(r * N) on every video family and `by_frame` adds up.

The reference below is our own reading of vllm-project/vllm at 094f117, vllm/multimodal/evs.py, with the lines
it follows; none is a copy. vLLM runs it on the merger's output, one temporal group a frame (Qwen2.5-VL's
`_postprocess_video_embeds_evs` passes the video's grid_thw and spatial_merge_size); on LLaVA-OneVision, which
vLLM does not prune, the reference runs on the frames' 14 x 14 pooled tokens (merge size 1), and the newline
after the last frame ranks right after the first frame here.
"""

import pytest
import torch
from test_video import write

import backends
from explorer import Budget, ExplorerError, Signals, make, run
from explorer.core import FEATURES
from explorer.engine.video import load_video
from explorer.methods import unavailable

PROMPT = "What happens in this video?"
FAMILIES = ["tiny-llava-onevision", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm"]  # video
CLIPS = {"mpeg4": ("clip.mp4", 40, 16), "libx264": ("clip.mkv", 30, 12)}  # codec: (file, frames written, decoded)
MODELS = {"tiny-llava-onevision": 1, "tiny-qwen2-vl": 2}  # times the frames decoded: Qwen folds 2 into a group


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    return {codec: write(folder / file, codec, count=n) for codec, (file, n, _) in CLIPS.items()}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param, backends.load(request.param, "cpu")


def official(embeds: torch.Tensor, frames: int, q: float) -> torch.Tensor:
    """vLLM's retention mask, (T * M,) bool, of the (T * M, D) frame tokens (rows and columns already merged)."""
    video = embeds.reshape(frames, -1, embeds.size(-1))  # lines 60-68 (the grid's rows and columns flattened)
    per_frame = video.shape[1]
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(video[1:], video[:-1], dim=-1)  # lines 70-74
    dissimilarity = torch.cat([255 * torch.ones_like(video[:1, :, 0]), dissimilarity], dim=0)  # lines 76-79
    order = torch.argsort(dissimilarity.view(-1), dim=-1, descending=True, stable=True)  # lines 81-82
    count = max(per_frame, int(per_frame * frames * (1 - q)))  # compute_retained_tokens_count, lines 17-36
    mask = torch.zeros(frames * per_frame, dtype=torch.bool)  # lines 86-92
    mask[order[:count]] = True
    return mask


def signals(backend, clip) -> Signals:
    prepared = backend.prepare_video(clip.frames, PROMPT, clip.times_s)
    with torch.no_grad():
        _, maps = backend.encode(prepared, (FEATURES,))
    return Signals(prepared.geometry, 0, maps)


@pytest.mark.parametrize("codec", list(CLIPS))
@pytest.mark.parametrize("q", [0.75, 0.9])
def test_the_kept_tokens_are_vllm_s(model, files, codec, q):
    name, backend = model
    s = signals(backend, load_video(files[codec], frames=CLIPS[codec][2] * MODELS[name]))
    g = s.geometry
    frames = torch.cat([g.members(p) for p in g.frames])  # (T * M,) in LLM order, each frame in raster order
    newline = [i for i in range(len(g)) if i not in set(frames.tolist())]
    mask = official(s[FEATURES][frames].float(), len(g.frames), q)
    chosen = make("evs").select(Signals(g, int(mask.sum()) + len(newline), s.maps))
    assert chosen.keep.tolist() == sorted(frames[mask].tolist() + newline)
    first = len(g.members(g.frames[0]))
    assert int(mask.sum()) > first and chosen.budgets[g.names[g.frames[0]]] == first  # more than the first frame
    assert len({chosen.budgets[g.names[p]] for p in g.frames[1:]}) > 1  # frames that changed more keep more


@pytest.mark.parametrize("budget", [0.25, 0.1])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_meets_the_budget_and_by_frame_adds_up(files, name, budget):
    clip = load_video(files["mpeg4"], frames=8)
    result = run(backends.load(name, "cpu"), clip, PROMPT, "evs", budget, max_new_tokens=1)
    t, g, n = result.tokens, result.geometry, len(result.geometry)
    assert t["visual_full"] == n and t["visual_kept"] == Budget(budget).resolve(n) == len(result.selection.keep)
    assert sum(f["full"] for f in t["by_frame"]) == n and sum(f["kept"] for f in t["by_frame"]) == t["visual_kept"]
    assert sum(result.selection.budgets.values()) == t["visual_kept"]
    change = result.selection.maps["change from previous frame"]
    assert change[g.members(g.frames[0])].isnan().all() and not change[g.members(g.frames[1])].isnan().any()


def test_below_one_frame_it_keeps_the_first_frame_s_first_tokens(files):
    """vLLM keeps at least the whole first frame; here the budget holds: the first frame's first B tokens."""
    s = signals(backends.load("tiny-llava-onevision", "cpu"), load_video(files["mpeg4"], frames=4))
    assert make("evs").select(Signals(s.geometry, 78, s.maps)).keep.tolist() == list(range(78))
    assert make("evs").select(Signals(s.geometry, 197, s.maps)).keep.tolist() == [*range(196), 784]  # + newline


def test_an_image_is_refused_with_the_reason(files):
    onevision = backends.load("tiny-llava-onevision", "cpu")
    assert "runs on clips" in unavailable("evs", onevision, clip=False)
    with pytest.raises(ExplorerError, match="give it a clip"):
        run(onevision, load_video(files["mpeg4"], frames=2).frames[0], PROMPT, "evs", Budget(0.25), max_new_tokens=1)
