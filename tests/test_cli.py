"""The command line: results, listings, the bench, and one clear message with exit code 2 for bad input."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import photo
from PIL import Image

from explorer import make
from explorer.cli import main

ROOT = Path(__file__).parent.parent
TINY = ["--model", "tiny-llava-next"]
EVERY = "none random uniform pooling cls vtc-cls hired visionzip prumerge+ globalcom2 divprune vispruner tome tome-vit transprune fastv pdrop dart sparsevlm mustdrop aim transprune-llm gemfilter frames dycoke free-video-llm fastvid holitom vidcom2 evs".split()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "photo.jpg"
    photo(640, 480).save(path)
    return str(path)


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_the_result_as_json(capsys, image):
    code, out, _ = cli(
        capsys,
        "run",
        *TINY,
        "--image",
        image,
        "--prompt",
        "What is it?",
        "--method",
        "hired",
        "--budget",
        "0.2",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["method"] == "hired" and result["budget"] == 0.2
    assert result["settings"] == {"alpha": 0.5, "paper_code": False} and result["random_weights"] is True
    assert result["tokens"]["visual_full"] == 2340 and result["tokens"]["visual_kept"] == 468
    assert result["timing"]["ttft_s"] > 0 and result["memory"]["peak_bytes"] > 0


def test_run_streams_the_answer_then_a_summary(capsys, image):
    code, out, err = cli(
        capsys,
        "run",
        *TINY,
        "--image",
        image,
        "--prompt",
        "What?",
        "--method",
        "hired",
        "--tokens",
        "300",
        "--set",
        "alpha=0.25",
        "--set",
        "paper_code=true",
        "--max-new-tokens",
        "3",
    )
    assert code == 0 and err == ""
    assert "hired (alpha=0.25, paper_code=True), budget 300 tokens" in out
    # the official code's shares: int(0.25 * 300) = 75 for the thumbnail, each crop's share of 225 floored
    assert "visual tokens kept 297 of 2340 (base 75/576" in out and "newline 0/36" in out
    assert "first token" in out and "peak memory (cpu)" in out and "random weights" in out


def test_run_summarises_where_an_llm_stage_method_cut(capsys, image):
    args = ["--image", image, "--prompt", "What?", "--method", "pdrop", "--tokens", "300", "--max-new-tokens", "2"]
    settings = ["--set", "stages=2", "--set", "keep_positions=true", "--set", "budget_after_cuts=true"]
    code, out, err = cli(capsys, "run", *TINY, *args, *settings)
    assert code == 0 and err == ""
    assert "pdrop (stages=2, ratio=0.5, keep_positions=True, budget_after_cuts=True), budget 300 tokens (left" in out
    assert "visual tokens kept 300 of 2340" in out
    # 32 layers in 3 stages: cuts before layers 32 * 1 // 3 = 10 and 32 * 2 // 3 = 21, keeping the official
    # int(2340 / 2^s) = 1170, 585 scaled by 300 / 585: 600 and 300; layers 0-9 see 2340, 10-20 600, 21-31 300:
    # (10 * 2340 + 11 * 600 + 11 * 300) / 32 = 33300 / 32 = 1040.625
    assert "inside the LLM: 600 from layer 10 (scored at 10), 300 from layer 21 (scored at 21); " in out
    assert "visual tokens per layer, averaged: 1040.6" in out


def test_run_says_an_llm_stage_budget_is_a_layer_mean_and_when_the_decode_reranks(capsys, image):
    args = ["--image", image, "--prompt", "What?", "--method", "fastv", "--tokens", "1200", "--max-new-tokens", "2"]
    code, out, err = cli(capsys, "run", *TINY, *args, "--set", "rerank=true")
    assert code == 0 and err == ""
    assert "budget 1200 tokens (visual tokens per LLM layer, averaged)" in out
    # layers 0-1 see 2340, layers 2-31 the R kept: the largest R with (2 * 2340 + 30 R) / 32 <= 1200 is
    # (32 * 1200 - 4680) / 30 = 1124, a mean of exactly 1200
    assert "inside the LLM: 1124 from layer 2 (scored at 1); visual tokens per layer, averaged: 1200.0" in out
    assert "decode without a KV cache, the tokens chosen again at every new token (slow" in out
    code, _, err = cli(capsys, "run", *TINY, *args[:-4], "--tokens", "100", "--max-new-tokens", "1")
    assert code == 2 and "fastv: a budget of 100 visual tokens per LLM layer on average is less than" in err
    assert "averages 147.2 over the 32 layers" in err  # 1 token kept: (2 * 2340 + 30) / 32 = 147.1875


def test_methods_lists_every_method_with_its_settings(capsys):
    code, out, _ = cli(capsys, "methods")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == EVERY
    assert "[alpha=0.5, paper_code=False]" in out and "FasterVLM" in out
    assert "[adaptive=False, spatial=0.75, neighbours=32]" in out and "[contextual=0.15625, paper_code=False]" in out
    assert "fastv      FastV: before LLM layer K" in out
    assert "[layer=2, keep_positions=True, budget_after_cuts=False, rerank=False]" in out


def test_models_tabulates_every_family_on_its_random_weight_model(capsys):
    code, out, _ = cli(capsys, "models", "--sizes", "672x672,1920x1080")
    assert code == 0
    rows = [line.split(" | ") for line in out.splitlines()[2:]]
    assert {row[3]: row[4:6] for row in rows} == {
        "`tiny-llava-next`": ["2928", "1948"],
        "`tiny-llava-onevision`": ["3699", "7269"],
        "`tiny-qwen2-vl`": ["576", "1222"],
        "`tiny-qwen2.5-vl`": ["576", "1222"],
        "`tiny-qwen3-vl`": ["441", "1222"],
        "`tiny-smolvlm`": ["1088", "832"],
        "`tiny-idefics3`": ["1088", "832"],
        "`tiny-llava-1.5`": ["576", "576"],
        "`tiny-gemma3`": ["256", "256"],
        "`tiny-internvl3`": ["1280", "2304"],  # 2x2 448-px tiles + the thumbnail; 4x2 tiles + it (1920x1080), 256 each
        "`tiny-qwen3.5`": ["441", "1222"],  # Qwen3-VL's processor: one token per 32x32 pixels
    }
    assert "| Qwen2-VL | `qwen2_vl` | `Qwen/Qwen2-VL-2B-Instruct` |" in out and "| `globalcom2`, `tome-vit` |" in out
    assert cli(capsys, "models", "--sizes", "672")[0] == 2


def test_bench_prints_a_table_and_writes_csv(capsys, image, tmp_path):
    csv_path = tmp_path / "bench.csv"
    code, out, _ = cli(
        capsys,
        "bench",
        *TINY,
        "--image",
        image,
        "--methods",
        "hired,fastv",
        "--budgets",
        "1,0.6,0.05",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--max-new-tokens",
        "3",
        "--csv",
        str(csv_path),
        "--plot",
        str(tmp_path / "bench.html"),
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == ["", "tiny-llava-next 640x480 batch 1"]
    assert lines[2].split()[:5] == ["method", "budget", "kept/full", "per", "layer"]
    rows = list(csv.DictReader(csv_path.open()))
    mean = [float(r["visual_layer_mean"]) if r["visual_layer_mean"] else None for r in rows]
    assert [(r["method"], r["budget"], r["visual_kept"], m) for r, m in zip(rows, mean)] == [
        ("none", "-", "2340", 2340),
        ("hired", "1", "2304", 2304),
        ("hired", "0.6", "1404", 1404),
        ("hired", "0.05", "117", 117),
        ("fastv", "1", "2340", 2340),
        # a layer mean of 1404 on 32 layers: layers 0-1 see all 2340, 2-31 the R kept, the largest R with
        # (2 * 2340 + 30 R) / 32 <= 1404 is 1341
        ("fastv", "0.6", "1341", (2 * 2340 + 30 * 1341) / 32),
        ("fastv", "0.05", "", None),  # 117 as a layer mean is out of reach (1 kept averages 147.2): the row says why
        ("uniform", "2304 tokens", "2304", 2304),  # the floors: as many tokens per layer, no selection work
        ("uniform", "1404 tokens", "1404", 1404),  # hired's at 0.6
        ("uniform", "117 tokens", "117", 117),
        ("uniform", "1403 tokens", "1403", 1403),  # fastv's at 0.6: its mean 1403.4375, rounded
    ]
    assert "fastv: a budget of 117 visual tokens per LLM layer on average is less than" in rows[6]["answer"]
    assert rows[2]["floor_ttft_s"] == rows[8]["ttft_s"] and rows[5]["floor_ttft_s"] == rows[10]["ttft_s"]
    assert float(rows[0]["ttft_ratio"]) == 1.0 and all(float(r["ttft_s"]) > 0 for r in rows if r["ttft_s"])
    # drift on the unreduced answer: none against itself is zero; fastv at 0.6 cuts most tokens at layer 2
    assert (rows[0]["logprob_diff"], rows[0]["kl"], rows[0]["first_divergence"]) == ("0.0", "0.0", "")
    assert float(rows[5]["kl"]) > 0 and lines[2].split()[-5:] == ["logp", "diff", "KL", "parts", "at"]


def test_run_with_fidelity_reports_the_drift(capsys, image):
    args = ["--image", image, "--prompt", "What is it?", "--method", "cls", "--budget", "0.01", "--max-new-tokens", "4"]
    code, out, _ = cli(capsys, "run", *TINY, *args, "--fidelity", "--json")
    assert code == 0
    drift = json.loads(out)["fidelity"]
    assert drift["kl"] > 0 and len(drift["per_token"]["kl"]) == 4
    assert abs(drift["logprob_diff"] - (drift["logprob"] - drift["full_logprob"])) < 1e-6
    code, out, _ = cli(capsys, "run", *TINY, *args, "--fidelity")
    assert code == 0 and "drift on the full answer: log-prob/token" in out


def test_bench_runs_every_method_by_default(capsys, image, tmp_path):
    csv_path = tmp_path / "bench.csv"
    args = ["--image", image, "--budgets", "0.1", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2"]
    code, out, _ = cli(
        capsys, "bench", *TINY, *args, "--no-floor", "--csv", str(csv_path), "--plot", str(tmp_path / "b.html")
    )
    assert code == 0
    rows = list(csv.DictReader(csv_path.open()))
    measured = [m for m in EVERY if m != "uniform" and "clip" not in make(m).requires]  # uniform: the floor,
    # measured with each cell unless --no-floor; frames and the video methods run on clips
    assert [r["method"] for r in rows] == measured
    assert [line.split()[0] for line in out.splitlines()[3 : 3 + len(measured)]] == measured
    inside = [r for r in rows[1:] if make(r["method"]).stage == "llm"]  # 234 as a layer mean
    assert all(r["visual_kept"] == "234" for r in rows[1:] if r not in inside)
    missed = [r for r in inside if "per LLM layer on average is less than" in r["answer"]]  # too few for them
    assert missed and all(float(r["visual_layer_mean"]) <= 234 for r in inside if r not in missed)


def test_bench_without_plotly_writes_its_rows_and_says_there_is_no_chart(capsys, image, tmp_path, monkeypatch):
    from explorer.evaluation import bench

    def charts(groups):  # as where only the bench's needs are installed (a lent GPU machine)
        raise ImportError("No module named 'plotly'")

    monkeypatch.setattr(bench, "charts", charts)
    csv_path, args = tmp_path / "b.csv", ["--methods", "cls", "--budgets", "0.5", "--repeats", "1", "--warmup", "0"]
    code, out, _ = cli(capsys, "bench", *TINY, "--image", image, *args, "--max-new-tokens", "1", "--no-floor",
                       "--csv", str(csv_path), "--plot", str(tmp_path / "b.html"))  # fmt: skip
    assert code == 0 and [r["method"] for r in csv.DictReader(csv_path.open())] == ["none", "cls"]
    assert "wrote no chart (No module named 'plotly': pip install plotly)" in out and not (tmp_path / "b.html").exists()


def test_run_labels_an_adaptive_count(capsys, image):
    args = ["--image", image, "--prompt", "What?", "--method", "prumerge+", "--set", "adaptive=true"]
    code, out, err = cli(capsys, "run", *TINY, *args, "--max-new-tokens", "2")
    assert code == 0 and err == ""
    assert "prumerge+ (adaptive=True, spatial=0.75, neighbours=32), budget adaptive" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.jpg"], "no image file at missing.jpg"),
        (["--budget", "0"], r"fraction in \(0, 1\], got 0.0"),
        (["--budget", "1.5"], r"fraction in \(0, 1\], got 1.5"),
        (["--budget", "-0.2"], r"fraction in \(0, 1\]"),
        (["--tokens", "0"], "at least 1 token, got 0"),
        (["--tokens", "2341"], "2341 tokens is more than the 2340 this image has"),
        (["--method", "fastest"], "unknown method 'fastest'; choose one of"),
        (["--set", "alpha=2"], "alpha must be between 0.0 and 1.0, got 2.0"),
        (["--set", "alpha=lots"], "alpha must be a number, got 'lots'"),
        (["--set", "paper_code=maybe"], "paper_code must be true or false"),
        (["--set", "alpha"], "--set takes KEY=VALUE"),
        (["--set", "beta=1"], "hired has no setting 'beta'"),
        (["--prompt", "  "], "the prompt is empty"),
        (["--model", "explorer-tests/not-cached"], "not a local folder .* --model tiny-llava-next"),
        (["--model", "/no/such/folder"], "no such folder"),
        (["--max-new-tokens", "0"], "max_new_tokens must be 1..4096"),
        (["--timeout", "0"], "the timeout must be a positive number of seconds, got 0.0"),
    ],
)
def test_bad_input_gets_one_clear_message_and_exit_code_2(capsys, image, args, message):
    options = {"--model": "tiny-llava-next", "--image": image, "--prompt": "What is it?", "--max-new-tokens": "2"}
    options.update(zip(args[::2], args[1::2]))
    code, out, err = cli(capsys, "run", *(x for pair in options.items() for x in pair))
    assert code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_unreadable_files_and_folders_through_the_cli(capsys, image, tmp_path):
    import transformers

    transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "llama"
    )
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    cases = [
        (["--image", str(tmp_path / "empty.jpg")], "is empty"),
        (["--image", str(tmp_path / "corrupt.jpg")], "could not be decoded|is not an image"),
        (["--model", str(tmp_path)], "has no config.json"),
        (
            ["--model", str(tmp_path / "llama")],
            "is a 'llama' checkpoint; the explorer runs llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, "
            "qwen3_5, qwen3_5_moe, idefics3, smolvlm, llava, gemma3, internvl checkpoints",
        ),
    ]
    for args, message in cases:
        options = {"--model": "tiny-llava-next", "--image": image, "--prompt": "hi", **dict(zip(args[::2], args[1::2]))}
        code, _, err = cli(capsys, "run", *(x for pair in options.items() for x in pair))
        assert code == 2 and "Traceback" not in err and re.search(message, err), err


@pytest.mark.parametrize(
    "mode, fmt, tokens",
    [
        ("RGBA", "PNG", 2340),
        ("P", "PNG", 2340),
        ("L", "PNG", 2340),
        ("I;16", "PNG", 2340),
        ("CMYK", "JPEG", 2340),
        ("RGB", "EXIF", 2352),
    ],
)
def test_odd_image_modes_run_through_the_cli(capsys, tmp_path, mode, fmt, tokens):
    path = tmp_path / "image"
    if fmt == "EXIF":  # stored 640x480, shown rotated: 480 wide, 640 tall: 36 of 48 crop columns
        exif = Image.Exif()
        exif[0x0112] = 6
        photo(640, 480).save(path, "JPEG", exif=exif)
    else:
        photo(640, 480).convert(mode).save(path, fmt)
    code, out, err = cli(
        capsys, "run", *TINY, "--image", str(path), "--prompt", "hi", "--max-new-tokens", "1", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["tokens"]["visual_full"] == tokens


def test_a_huge_image_runs_through_the_cli(capsys, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (10_000, 10_000), (40, 90, 160)).save(path, compress_level=1)
    code, out, _ = cli(capsys, "run", *TINY, "--image", str(path), "--prompt", "hi", "--max-new-tokens", "1", "--json")
    assert code == 0 and json.loads(out)["tokens"]["visual_full"] == 2928


def test_python_dash_m_explorer_runs_the_readme_example():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "explorer",
        "run",
        *TINY,
        "--image",
        "assets/coffee.jpg",
        "--prompt",
        "What is on the table?",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(done.stdout)["tokens"]["visual_full"] == 2144
    )  # 600x400: 576 + 2x2 crops unpadded to 32 rows of 48, + 32 newlines
    bad = subprocess.run(
        command[:-5] + ["--prompt", ""], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr == "error: the prompt is empty: ask something about the image\n"


def test_without_a_model_or_network_run_and_bench_take_the_defaults_tiny_model_and_say_so(
    capsys, image, monkeypatch, tmp_path
):
    """No --model, the default (SmolVLM-256M on a CPU) not in the Hugging Face cache, no Hub (the tests set
    HF_HUB_OFFLINE): one notice on stderr, and the run is on tiny-idefics3, random weights."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # an empty cache
    args = ["--image", image, "--prompt", "hi", "--device", "cpu", "--method", "random", "--max-new-tokens", "1"]
    code, out, err = cli(capsys, "run", *args, "--json")
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert code == 0 and len(notices) == 1
    assert "HuggingFaceTB/SmolVLM-256M-Instruct" in notices[0] and "--model or set EXPLORER_MODEL" in notices[0]
    result = json.loads(out)
    assert result["model"] == "tiny-idefics3" and result["random_weights"] is True
    bench = ["--image", image, "--device", "cpu", "--methods", "random", "--budgets", "0.5", "--max-new-tokens", "1"]
    code, out, err = cli(capsys, "bench", *bench, "--repeats", "1", "--warmup", "0", "--no-floor")
    assert code == 0 and "tiny-idefics3 640x480 batch 1" in out and err.count("notice:") == 1
    code, _, err = cli(capsys, "run", *args, "--model", "HuggingFaceTB/SmolVLM-256M-Instruct")  # named: no fallback
    assert code == 2 and "notice:" not in err and "could not be loaded from the Hugging Face cache or the Hub" in err
