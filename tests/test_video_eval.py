"""Video in the evaluation (issue 25): the example clips in assets/eval-video, `python -m explorer eval
--dataset ... --frames N` end to end on tiny-llava-onevision, and the lmms-eval model `explorer` answering a
video request built as lmms-eval 0.7.3 builds those of its video tasks (EgoSchema here, no download)."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

import backends
from explorer import ExplorerError, run
from explorer.cli import main
from explorer.core import Budget, fraction_of
from explorer.engine.video import load_video
from explorer.evaluation import accuracy, localdata

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "assets" / "eval-video"
FRAMES, LENGTH = 2, 3  # frames sampled from each clip, new tokens per answer
PER_FRAME = 196  # LLaVA-OneVision's tokens per video frame (27x27 patches pooled to 14x14); one newline per clip


@pytest.fixture(scope="module")
def onevision():
    return backends.load("tiny-llava-onevision", "cpu")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """none, and the frames baseline at 50%, on the example clips, 2 frames each."""
    out = tmp_path_factory.mktemp("eval")
    grid = ["--model", "tiny-llava-onevision", "--dataset", str(EXAMPLE), "--frames", str(FRAMES), "--device", "cpu"]
    grid += ["--methods", "frames", "--budgets", "0.5", "--max-new-tokens", str(LENGTH), "--output", str(out)]
    assert main(["eval", *grid]) == 0
    return out


def test_the_example_clips_are_what_make_py_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("make", EXAMPLE / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    docs = localdata.read(EXAMPLE)
    assert [(d["id"], d["question"], d["answers"]) for d in docs] == [(n, q, a) for n, _, q, a in make.SET]
    for doc, (name, frames, _, _) in zip(docs, make.SET):
        make.encode(frames, tmp_path / "clip.mp4")
        assert (tmp_path / "clip.mp4").read_bytes() == (EXAMPLE / doc["video"]).read_bytes(), name
    clip = load_video(EXAMPLE / "videos" / "red-moves-right.mp4", frames=8)
    red = [[x for x in range(clip.size[0]) if frame.getpixel((x, 48))[1] < 100] for frame in clip.frames]
    assert [xs[0] for xs in red] == sorted(xs[0] for xs in red) and red[0][0] == 0 and red[-1][-1] > 100
    lit = [frame.getpixel((5, 5))[0] > 200 for frame in load_video(EXAMPLE / "videos" / "three-flashes.mp4").frames]
    assert sum(a and not b for a, b in zip(lit, [False, *lit])) == 3  # 3 flashes, each seen in 8 frames


def test_the_grid_on_clips_writes_rows_with_the_clips_token_counts(evaluated):
    rows = accuracy.read(evaluated / "summary.json")
    n = FRAMES * PER_FRAME + 1
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 1), ("frames", 0.5)]
    for row in rows:
        assert (row["task"], row["metric"], row["n"], row["visual_full_mean"]) == (
            "local_eval_video",
            "exact_match",
            6,
            n,
        )
        assert row["visual_kept_mean"] == (n if row["method"] == "none" else fraction_of(0.5, n))
        assert row["ttft_s_mean"] > 0
    cell = json.loads((evaluated / "frames_0.5" / "cell.json").read_text())
    assert cell["config"]["frames"] == FRAMES
    (results,) = (evaluated / "frames_0.5").rglob("*_results.json")
    assert "frames=2" in json.loads(results.read_text())["config"]["model_args"]


def test_the_answers_are_the_pipelines_on_the_sampled_frames(evaluated, onevision):
    """Each logged answer is the pipeline's on the clip of FRAMES frames sampled from the question's video."""
    docs = localdata.read(EXAMPLE)
    for cell, method, budget in [("none", "none", 1.0), ("frames_0.5", "frames", 0.5)]:
        (samples,) = (evaluated / cell).rglob("*_samples_local_eval_video.jsonl")
        logged = [json.loads(line) for line in samples.read_text().splitlines()]
        records = [json.loads(line) for line in (evaluated / cell / "explorer_samples.jsonl").read_text().splitlines()]
        for doc, sample, record in zip(docs, logged, records, strict=True):
            clip = load_video(EXAMPLE / doc["video"], frames=FRAMES)
            result = run(onevision, clip, doc["question"], method, Budget(fraction=budget), max_new_tokens=LENGTH)
            assert sample["filtered_resps"] == result.answer.split("\n\n")[0], doc["id"]
            assert (record["visual_kept"], record["prefill_flops"]) == (
                result.tokens["visual_kept"],
                result.cost["prefill_flops"],
            )


def test_a_video_entry_is_checked_like_an_image_entry(capsys, tmp_path):
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"id": "a", "video": "videos/none.mp4", "question": "Which way?", "answer": "left"})
    )
    with pytest.raises(ExplorerError, match="line 1: the video videos/none.mp4 is not in"):
        localdata.read(tmp_path)
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "video": "a.mp4", "answer": "x"}))
    with pytest.raises(ExplorerError, match="give an 'image' or a 'video'"):
        localdata.read(tmp_path)
    code = main(["eval", "--model", "tiny-llava-onevision", "--dataset", str(EXAMPLE), "--frames", "65"])
    assert code == 2 and "--frames must be from 1 to 64, got 65" in capsys.readouterr().err


def test_the_lmms_eval_model_answers_a_video_task_s_request(onevision, tmp_path, monkeypatch):
    """A request as lmms-eval 0.7.3 builds one for EgoSchema: `ConfigurableTask.construct_requests`
    (lmms_eval/api/task.py, the `generate_until` branch) passes (context, generation arguments,
    doc_to_visual, doc_id, task, split), and EgoSchema's `doc_to_visual` (tasks/egoschema/utils.py) gives
    the path of the question's video file in its cache folder, as a list of one string."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.tasks.egoschema import utils as egoschema

    from explorer.evaluation.lmms import ExplorerModel

    video = tmp_path / "clip-0001.mp4"
    video.write_bytes((EXAMPLE / "videos" / "blue-moves-left.mp4").read_bytes())
    monkeypatch.setattr(egoschema, "cache_dir", str(tmp_path))  # where the task keeps its downloaded videos
    doc = {"video_idx": "clip-0001", "question": "Which way does it move?", "option": ["A. left", "B. right"]}
    context = egoschema.egoschema_doc_to_text(doc, {"pre_prompt": "", "post_prompt": ""})
    options = {"max_new_tokens": LENGTH, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    meta = {"task": "egoschema", "doc_id": 0, "repeats": 1}
    request = Instance(
        "generate_until",
        (context, copy.deepcopy(options), egoschema.egoschema_doc_to_visual, 0, "egoschema", "test"),
        0,
        meta,
    )
    model = ExplorerModel("tiny-llava-onevision", method="frames", budget=0.5, device="cpu", frames=4)
    model.task_dict = {"egoschema": {"test": [doc]}}
    (answer,) = model.generate_until([request])
    clip = load_video(video, frames=4)
    result = run(onevision, clip, context, "frames", Budget(fraction=0.5), max_new_tokens=LENGTH)
    assert answer.text == result.answer.split("\n\n")[0]
    (record,) = model.records
    assert (record["visual_full"], record["visual_kept"]) == (4 * PER_FRAME + 1, fraction_of(0.5, 4 * PER_FRAME + 1))
    assert answer.token_counts.output_tokens == result.tokens["generated"]
