"""`python -m explorer eval` and the lmms-eval model `explorer`, end to end on the tiny LLaVA-NeXT and the
example set in assets/eval: summary rows, answers equal to stock generate(), the pipeline's own token
counts, two processes, resuming, and one clear error for each bad input."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
import transformers

from explorer import run
from explorer.cli import main
from explorer.core import Budget
from explorer.engine.images import load_image
from explorer.evaluation import accuracy, localdata

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "assets" / "eval"
LENGTH = 4  # new tokens per answer
GRID = ["--model", "tiny-llava-next", "--methods", "hired,fastv", "--budgets", "0.5,0.2"]
# FastV's budget counted after its cut: it keeps as many tokens as HiRED does (a layer mean would keep more)
GRID += ["--set", "budget_after_cuts=true", "--max-new-tokens", str(LENGTH)]
SETTINGS = {"budget_after_cuts": True}  # what --set gives fastv (hired has no such setting)
CELLS = [("none", 1), ("hired", 0.5), ("hired", 0.2), ("fastv", 0.5), ("fastv", 0.2)]
MEANS = ("visual_full_mean", "visual_kept_mean", "visual_layer_mean", "prefill_tflops_mean", "kv_bytes_mean")


def evaluate(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def lmms_eval_files(cell: Path) -> tuple[dict, list[dict]]:
    """lmms-eval's results and its logged samples of a cell's folder."""
    (results,) = cell.rglob("*_results.json")
    (samples,) = cell.rglob("*_samples_local_eval.jsonl")
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The grid on the example set: none, hired and fastv at 50% and 20%."""
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", *GRID, "--dataset", str(EXAMPLE), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def stock_answers(checkpoint):
    """Stock transformers' greedy answer to every question of the example set, cut at the task's stop string."""
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    answers = []
    for doc in localdata.read(EXAMPLE):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=load_image(str(EXAMPLE / doc["image"])), text=text, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=LENGTH)[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.decode(ids, skip_special_tokens=True).split("\n\n")[0])
    return answers


def test_the_grid_writes_summary_csv_chart_and_lmms_evals_own_files(evaluated):
    rows = accuracy.read(evaluated / "summary.json")
    assert [(r["method"], r["budget"]) for r in rows] == CELLS
    for row in rows:
        assert set(row) == set(accuracy.COLUMNS) and all(row[c] is not None for c in accuracy.COLUMNS), row
        assert (row["task"], row["metric"], row["n"]) == ("local_eval", "exact_match", 8)
        assert row["ttft_s_mean"] > 0 and row["prefill_tflops_mean"] > 0 and row["kv_bytes_mean"] > 0
        folder = evaluated / ("none" if row["method"] == "none" else f"{row['method']}_{row['budget']:g}")
        results, samples = lmms_eval_files(folder)
        assert results["results"]["local_eval"]["exact_match,none"] == row["value"]
        assert results["config"]["model_args"].startswith(f"pretrained=tiny-llava-next,method={row['method']}")
        assert [s["doc_id"] for s in samples] == list(range(8))
        assert sum(s["exact_match"] for s in samples) / 8 == row["value"]
    with open(evaluated / "summary.csv") as table:
        assert table.readline().strip() == ",".join(accuracy.COLUMNS) and len(table.readlines()) == len(CELLS)
    assert "plotly" in (evaluated / "summary.html").read_text()
    assert (evaluated / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows[0]["value"] = 0.5
    assert len(accuracy.figure(rows, "visual_layer_mean").data) == 3  # none, hired, fastv


def test_none_answers_as_stock_generate_does(evaluated, stock_answers):
    _, samples = lmms_eval_files(evaluated / "none")
    assert [s["filtered_resps"] for s in samples] == stock_answers
    _, reduced = lmms_eval_files(evaluated / "hired_0.2")
    assert [s["token_counts"][0]["output_tokens"] for s in reduced] == [LENGTH] * 8


def test_a_set_answered_with_stock_answers_scores_exactly_one(capsys, tmp_path, stock_answers):
    shutil.copytree(EXAMPLE / "images", tmp_path / "set" / "images")
    docs = localdata.read(EXAMPLE)
    lines = [json.dumps({**doc, "answers": [answer]}) for doc, answer in zip(docs, stock_answers)]
    (tmp_path / "set" / "data.jsonl").write_text("\n".join(lines))
    code, out, _ = evaluate(capsys, *GRID[:2], "--methods", "none", "--max-new-tokens", str(LENGTH),
                            "--dataset", str(tmp_path / "set"), "--output", str(tmp_path / "out"))  # fmt: skip
    (row,) = accuracy.read(tmp_path / "out" / "summary.json")
    assert code == 0 and (row["method"], row["value"], row["n"]) == ("none", 1.0, 8)
    assert "| local_set | exact_match | none | 1 | 1.0 | 8 |" in out


def test_the_token_means_are_the_pipelines_own_counts(evaluated, backend):
    docs = localdata.read(EXAMPLE)
    for row in accuracy.read(evaluated / "summary.json"):
        folder = evaluated / ("none" if row["method"] == "none" else f"{row['method']}_{row['budget']:g}")
        records = [json.loads(line) for line in (folder / "explorer_samples.jsonl").read_text().splitlines()]
        own = []
        for doc, record in zip(docs, records, strict=True):
            image = load_image(str(EXAMPLE / doc["image"]))
            budget, settings = Budget(fraction=row["budget"]), SETTINGS if row["method"] == "fastv" else {}
            result = run(backend, image, doc["question"], row["method"], budget, settings=settings, max_new_tokens=1)
            counts = {k: result.tokens[k] for k in ("visual_full", "visual_kept", "visual_layer_mean")}
            counts |= {k: result.cost[k] for k in ("prefill_flops", "kv_bytes", "vision_flops")}
            assert {k: record[k] for k in counts} == counts
            own.append(counts)
        mean = {key: sum(c[key] for c in own) / len(own) for key in own[0]}
        expected = dict(zip(MEANS, [mean["visual_full"], mean["visual_kept"], mean["visual_layer_mean"]]))
        expected |= {"prefill_tflops_mean": mean["prefill_flops"] / 1e12, "kv_bytes_mean": mean["kv_bytes"]}
        assert {key: row[key] for key in MEANS} == pytest.approx(expected, rel=1e-12)
    hired, fastv = (accuracy.read(evaluated / "summary.json")[i] for i in (2, 4))
    assert hired["visual_kept_mean"] == hired["visual_layer_mean"] < hired["visual_full_mean"]
    assert fastv["visual_kept_mean"] == hired["visual_kept_mean"] < fastv["visual_layer_mean"]  # cut at layer 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_summary_as_one(capsys, checkpoint, tmp_path):
    """Five questions, so that the processes get three and two (lmms-eval pads the shorter share). The same
    weights, from the folder the tiny model was saved to: under accelerate only the first process could
    write a tiny model of its own."""
    grid = ["--model", checkpoint, "--methods", "hired,fastv", "--budgets", "0.2", "--limit", "5"]
    grid += ["--set", "budget_after_cuts=true"]
    grid += ["--max-new-tokens", str(LENGTH), "--dataset", str(EXAMPLE)]
    assert evaluate(capsys, *grid, "--output", str(tmp_path / "one"))[0] == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    command = [*launch, "-m", "explorer", "eval", *grid, "--output", str(tmp_path / "two")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # processes on the CPU, talking through gloo
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (accuracy.read(tmp_path / folder / "summary.json") for folder in ("one", "two"))
    assert [{**r, "ttft_s_mean": None} for r in two] == [{**r, "ttft_s_mean": None} for r in one]
    assert [(r["method"], r["n"]) for r in two] == [("none", 5), ("hired", 5), ("fastv", 5)]
    for name in ("none", "hired_0.2", "fastv_0.2"):
        answered = [lmms_eval_files(tmp_path / folder / name)[1] for folder in ("one", "two")]
        assert [(s["doc_id"], s["filtered_resps"]) for s in answered[1]] == [
            (0, ANY),
            (2, ANY),
            (4, ANY),
            (1, ANY),
            (3, ANY),
        ]
        assert sorted((s["doc_id"], s["filtered_resps"]) for s in answered[1]) == sorted(
            (s["doc_id"], s["filtered_resps"]) for s in answered[0]
        )
        records = (tmp_path / "two" / name / "explorer_samples.jsonl").read_text().splitlines()
        assert [json.loads(r)["doc_id"] for r in records] == [0, 1, 2, 3, 4]  # lmms-eval's padding not counted
    assert done.stdout.count("| local_eval |") == 3  # one summary, from the first process


class Interrupted(Exception):
    pass


def test_a_resumed_grid_recomputes_only_what_was_not_finished(capsys, tmp_path, monkeypatch):
    from explorer.evaluation import evaluate as grid
    from explorer.evaluation.lmms import ExplorerModel

    def args(length: int = 2) -> list[str]:
        chosen = ["--methods", "hired", "--budgets", "0.5,0.2", "--max-new-tokens", str(length), "--limit", "3"]
        return [*GRID[:2], *chosen, "--dataset", str(EXAMPLE), "--output", str(tmp_path)]

    record, answered = ExplorerModel._record, []

    def counted(self, request, result):  # which cell answered; the second cell stops at its third question
        if self.label.endswith("hired 0.5") and len(self.records) == 2 and interrupt:
            raise Interrupted
        answered.append(self.label.split("] ")[1])
        record(self, request, result)

    monkeypatch.setattr(ExplorerModel, "_record", counted)
    interrupt = True
    with pytest.raises(Interrupted):
        main(["eval", *args()])
    assert answered == ["none 1"] * 3 + ["hired 0.5"] * 2
    assert (tmp_path / "none" / grid.MARK).is_file() and not (tmp_path / "hired_0.5" / grid.MARK).exists()
    assert not (tmp_path / "summary.json").exists()
    finished = (tmp_path / "none" / grid.MARK).read_text()
    (tmp_path / "hired_0.5").mkdir(exist_ok=True)
    (tmp_path / "hired_0.5" / "half-written.json").write_text("{")  # what a crash while writing would leave
    interrupt, answered[:] = False, []
    assert evaluate(capsys, *args())[0] == 0
    assert answered == ["hired 0.5"] * 3 + ["hired 0.2"] * 3  # none was not run again
    assert (tmp_path / "none" / grid.MARK).read_text() == finished
    assert not (tmp_path / "hired_0.5" / "half-written.json").exists()
    rows = accuracy.read(tmp_path / "summary.json")
    assert [(r["method"], r["budget"], r["n"]) for r in rows] == [("none", 1, 3), ("hired", 0.5, 3), ("hired", 0.2, 3)]
    answered.clear()
    assert evaluate(capsys, *args())[0] == 0 and answered == []  # all done: nothing runs again
    code, _, err = evaluate(capsys, *args(length=3))
    assert code == 2 and "for other arguments (max_new_tokens: 2 there, 3 now)" in err


def _dataset(tmp_path, lines: list[str]) -> str:
    folder = tmp_path / "set"
    shutil.copytree(EXAMPLE / "images", folder / "images")
    (folder / "data.jsonl").write_text("\n".join(lines))
    return str(folder)


GOOD = json.dumps({"id": 1, "image": "images/red-square.png", "question": "What colour?", "answer": "red"})


@pytest.mark.parametrize(
    "lines, args, message",
    [
        ([GOOD, GOOD.replace("red-square", "purple-star")], [], "line 2: the image images/purple-star.png is not in"),
        ([GOOD, "{not json"], [], "data.jsonl, line 2 is not JSON"),
        ([GOOD.replace('"answer": "red"', '"answers": []')], [], "'answers' must be a non-empty list"),
        ([GOOD, GOOD], [], "line 2: the id '1' is used twice"),
        (["", "  "], [], "holds no questions"),
        (None, ["--tasks", "textvqa_vall"], "unknown lmms-eval task 'textvqa_vall'; did you mean textvqa_val"),
        ([GOOD], ["--methods", "hired,nope"], "unknown method 'nope'"),
        ([GOOD], ["--set", "nope=1"], "no method of hired has the setting nope"),
        ([GOOD], ["--set", "alpha=much"], "hired: alpha must be a number, got 'much'"),
        ([GOOD], ["--budgets", "0.2,2"], "the budget must be a fraction in (0, 1], got 2.0"),
        ([GOOD], ["--tokens", "2000"], "the budget of 2000 tokens is more than the 1176 this image has"),
    ],
)
def test_each_bad_input_is_one_clear_error_and_marks_nothing_done(capsys, tmp_path, lines, args, message):
    where = ["--dataset", _dataset(tmp_path, lines)] if lines is not None else []
    code, out, err = evaluate(capsys, "--model", "tiny-llava-next", "--max-new-tokens", "2", *where, *args,
                              "--output", str(tmp_path / "out"))  # fmt: skip
    last = err.strip().splitlines()[-1]  # after lmms-eval's progress bars, when a cell had started
    assert code == 2 and err.count("error: ") == 1 and last.startswith("error: ") and message in last, err
    marked = [path.parent.name for path in (tmp_path / "out").rglob("cell.json")]
    assert marked == (["none"] if "--tokens" in args else [])  # only a cell that finished is marked done
    assert not (tmp_path / "out" / "summary.json").exists()


def test_exact_match_normalizes_case_punctuation_articles_and_spaces():
    assert localdata.exact_match("  The  Red.", ["red"]) == 1.0
    assert localdata.exact_match("a cat!", ["dog", "Cat"]) == 1.0
    assert localdata.exact_match("two  circles", ["two circles"]) == 1.0
    assert localdata.exact_match("2 circles", ["2", "two"]) == 0.0
    assert localdata.exact_match("theory", ["ory"]) == 0.0  # only whole words are articles


def test_lmms_eval_finds_the_model_through_its_entry_point_and_reads_model_args():
    from lmms_eval.models import get_model

    from explorer.evaluation.lmms import ExplorerModel

    assert get_model("explorer") is ExplorerModel
    model = ExplorerModel.create_from_arg_string(
        "pretrained=tiny-llava-next,method=hired,budget=0.2,alpha=0.3", {"batch_size": 1, "device": "cpu"}
    )
    assert (model.method, model.budget, model.settings) == ("hired", Budget(fraction=0.2), {"alpha": 0.3})
    model.clean()  # lmms-eval calls it after every evaluation: the model stays
    assert model.backend.model is not None


def test_multiple_choice_scores_each_choice_on_the_reduced_model(backend):
    from lmms_eval.api.instance import Instance

    from explorer.engine import fidelity
    from explorer.evaluation.lmms import ExplorerModel

    model = ExplorerModel("tiny-llava-next", method="hired", budget=0.2, device="cpu")
    image = load_image(str(EXAMPLE / "images" / "blue-square.png"))
    model.task_dict = {"mc": {"test": [{"image": image}]}}
    question = "What colour is the square?"
    meta = {"task": "mc", "doc_id": 0, "repeats": 1}
    requests = [
        Instance("loglikelihood", (question, f" {c}", lambda doc: [doc["image"]], 0, "mc", "test"), i, meta)
        for i, c in enumerate(["red", "blue"])
    ]
    scored = model.loglikelihood(requests)
    for request, result in zip(requests, scored):
        ids = model.continuation_ids(question, request.args[1])
        logprobs = fidelity.logprobs(backend, image, question, ids, "hired", Budget(fraction=0.2))
        loss, greedy = result.text
        assert loss == pytest.approx(-logprobs[range(len(ids)), ids].mean().item())
        assert greedy == (logprobs.argmax(-1).tolist() == ids)
    whole = backend.tokenizer(backend.chat(question) + " blue", add_special_tokens=False)["input_ids"]
    assert whole[-len(model.continuation_ids(question, " blue")) :] == model.continuation_ids(question, " blue")
    (record,) = model.records  # the question's numbers, once for its two choices
    assert (record["doc_id"], record["visual_full"], record["visual_kept"]) == (0, 1176, 235)


def test_the_library_and_the_app_import_no_lmms_eval():
    code = "import explorer, backends, app, sys; print([m for m in sys.modules if m.startswith('lmms_eval')])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_app_shows_a_summary_from_its_eval_dir_or_an_upload(evaluated, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    import app
    from ui.accuracy import summaries
    from ui.session import Session

    assert summaries(str(evaluated)) == ["summary.json"]
    explorer = Session("tiny-llava-next", "cpu", warm_up=False)
    demo, url = app.serve(explorer, eval_dir=str(evaluated), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        rows = accuracy.read(evaluated / "summary.json")
        plot, table = client.predict("summary.json", "visual_layer_mean", api_name="/accuracy")
        assert [row[:6] for row in table["data"]] == [[r[c] for c in accuracy.COLUMNS[:6]] for r in rows]
        figure = json.loads(plot["plot"])
        assert [trace["name"] for trace in figure["data"]] == ["none (unreduced)", "hired", "fastv"]
        assert figure["data"][2]["x"] == [r["visual_layer_mean"] for r in rows if r["method"] == "fastv"][::-1]
        uploaded = client.predict(
            handle_file(str(evaluated / "summary.json")), "visual_kept_mean", api_name="/accuracy_upload"
        )
        assert uploaded[1]["data"] == table["data"]
        (tmp_path / "bad.json").write_text('{"rows": []}')
        with pytest.raises(AppError, match="bad.json is not a summary.json"):
            client.predict(handle_file(str(tmp_path / "bad.json")), "visual_kept_mean", api_name="/accuracy_upload")
    finally:
        demo.close()
