"""Shipping: the Space's configuration, ZeroGPU's separate process, a full queue, cancelling, abuse."""

import contextlib
import functools
import multiprocessing
import pickle
import re
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
import ui
from explorer.engine.pipeline import model_lock
from ui.explore import Explored
from ui.session import Session

ROOT = Path(__file__).parent.parent
OUTPUTS = Explored._fields
COFFEE = str(ROOT / "assets" / "coffee.jpg")


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_readme_front_matter_is_a_working_space_config():
    config = front_matter()
    assert config["sdk"] == "gradio" and (ROOT / config["app_file"]).is_file()
    requirements = (ROOT / "requirements.txt").read_text()
    assert f"gradio=={config['sdk_version']}" in requirements  # the Space runs the Gradio we test
    assert config["python_version"] == "3.12" and config["short_description"]
    assert config["preload_from_hub"] == config["models"] == [app.backends.DEFAULT_MODEL]
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)", requirements, re.M))  # pinned as a pair, CUDA builds
    assert set(pins) == {"torch", "torchvision"} and not any("+cpu" in v for v in pins.values())  # (a CPU torch
    # would break the Space's GPU and could not load torchvision, which the video processors need)


def test_the_spacefile_is_a_valid_deta_manifest():
    manifest = yaml.safe_load((ROOT / "Spacefile").read_text())
    assert manifest["v"] == 0
    (micro,) = manifest["micros"]
    assert micro["primary"] and micro["run"].startswith("python3 app.py")
    assert all((ROOT / path).exists() for path in micro["include"])


def test_nothing_enables_remote_code():
    for path in [ROOT / "app.py", *ROOT.glob("explorer/**/*.py"), *ROOT.glob("backends/*.py")]:
        assert "trust_remote_code" not in path.read_text(), path


def in_another_process(task=None, duration=None):
    """A stand-in for spaces.GPU: runs the generator in a forked process, as ZeroGPU does, and
    hands back each output through a pipe, pickled. Nothing it leaves behind reaches this process."""
    if task is None:
        return functools.partial(in_another_process, duration=duration)

    @functools.wraps(task)
    def handler(*args, **kwargs):
        assert 20 <= duration(*args, **kwargs) <= 300
        context = multiprocessing.get_context("fork")
        outputs = context.Queue()

        def child():
            torch.set_num_threads(1)
            try:
                for output in task(*args, **kwargs):
                    outputs.put(pickle.dumps(("output", output)))  # by value, as across machines
                outputs.put(pickle.dumps(("end", None)))
            except Exception as error:
                outputs.put(pickle.dumps(("error", error)))

        process = context.Process(target=child, daemon=True)
        process.start()
        try:
            while True:
                kind, value = pickle.loads(outputs.get(timeout=120))
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            process.join(timeout=10)

    return handler


def test_explore_works_when_zerogpu_runs_it_in_another_process(monkeypatch):
    monkeypatch.setattr(ui.explore, "GPU", in_another_process)
    explorer = Session("tiny-llava-next", "cpu")
    explorer.backend()  # loaded before the fork, as ZeroGPU asks
    demo, url = app.serve(explorer, prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False)
    try:
        out = dict(zip(OUTPUTS, client.predict(image=handle_file(COFFEE), max_new_tokens=3, api_name="/explore")))
        assert Image.open(out["overlay_0"]).size == (600, 400)
        rows = {row[0]: row[1:] for row in out["table"]["data"]}
        assert rows["visual tokens"] == ["428", "2144", "0.20x"] and rows["generated tokens"] == ["3", "3", "1.00x"]
        assert out["answer"] and out["full_answer"]
        with pytest.raises(AppError, match="prompt is empty"):  # errors cross the process boundary too
            client.predict(image=handle_file(COFFEE), prompt=" ", api_name="/explore")
    finally:
        client.close()
        demo.close()


@pytest.fixture(scope="module")
def explorer():
    return Session("tiny-llava-next", "cpu")


@pytest.fixture(scope="module")
def served(explorer):
    demo, url = app.serve(explorer, queue_size=4, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def good_request(url: str) -> dict:
    client = Client(url, verbose=False)
    try:
        return dict(zip(OUTPUTS, client.predict(image=handle_file(COFFEE), max_new_tokens=2, api_name="/explore")))
    finally:
        client.close()


def test_a_full_queue_answers_busy_and_nobody_hangs(served, explorer):
    """20 visitors at once while the first request holds the model: what fits in the queue (4 places)
    waits, the rest are told at once that it is full, and once the model is let go every waiting one is
    answered. The first request is held inside the model until every other visitor is either told busy
    or waiting in the queue, so the overlap is certain; every wait is bounded, so nothing can hang."""
    model = explorer.backend().model
    inside, release = threading.Event(), threading.Event()

    def hold(*_):  # the first request to reach the model waits here; later ones pass once it is let go
        inside.set()
        release.wait(timeout=240)

    results = []

    def visitor():
        try:
            results.append(("done", good_request(served)["table"]["data"][0]))
        except Exception as error:
            results.append(("error", str(error)))

    def waiting() -> int:  # requests in the server's queue, not yet started
        return httpx.get(f"{served}gradio_api/queue/status", timeout=30).json()["queue_size"]

    hook = model.lm_head.register_forward_hook(hold)
    visitors = [threading.Thread(target=visitor, daemon=True) for _ in range(20)]
    try:
        for v in visitors:
            v.start()
        assert inside.wait(timeout=240), "no request reached the model"
        deadline, everyone_seen = time.monotonic() + 240, False
        while not everyone_seen and time.monotonic() < deadline:
            time.sleep(0.05)
            everyone_seen = sum(kind == "error" for kind, _ in list(results)) + waiting() >= 19
        queued_while_held = waiting()
    finally:
        release.set()
        answered_by = time.monotonic() + 300
        for v in visitors:
            v.join(timeout=max(0.0, answered_by - time.monotonic()))
        hook.remove()
    assert everyone_seen, f"while the model was held, {results} answered and {waiting()} waited, of 19"
    assert queued_while_held >= 1  # the queue took some while it was full...
    assert not any(v.is_alive() for v in visitors), "a request hung"
    done = [value for kind, value in results if kind == "done"]
    busy = [value for kind, value in results if kind == "error"]
    assert len(done) + len(busy) == 20 and done and busy  # ...and turned the others away
    assert all(row == ["visual tokens", "428", "2144", "0.20x"] for row in done)
    assert all("Queue is full" in message and "try again" in message for message in busy)
    assert good_request(served)["answer"] is not None  # still serving


def test_cancelling_a_run_stops_generation(served, explorer, monkeypatch):
    """Cancelling stops generate() at its next token and frees the model; the next request works. From
    its 5th token on the run is slowed to 20 tokens a second, so that the cancel has 25 s to take effect
    before all 512 tokens could be generated, however loaded the machine; then the test waits (bounded)
    for generate() to come back and the model to be free, instead of for a fixed time."""
    model = explorer.backend().model
    lock, ended = model_lock(model), threading.Event()
    steps = []  # one per token computed: whether the run still held the model then

    def step(*_):
        steps.append(lock.locked())
        if len(steps) >= 5:
            ended.wait(timeout=0.05)  # slowed, not stopped: only the cancel may stop the run

    generate = model.generate

    def watched(*args, **kwargs):
        try:
            return generate(*args, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(model, "generate", watched)
    hook = model.lm_head.register_forward_hook(step)
    client = Client(served, verbose=False)
    try:
        job = client.submit(image=handle_file(COFFEE), max_new_tokens=512, compare=False, api_name="/explore")
        deadline = time.monotonic() + 120
        while len(steps) < 5 and not ended.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(steps) >= 5 and not ended.is_set(), "the run did not get to generating"
        with contextlib.suppress(httpx.TimeoutException):  # the server answers once the run has let go, which
            job.cancel()  # a loaded machine may take past the client's 5 s for: what counts is what follows
        assert ended.wait(timeout=120), "generate() still runs 2 minutes after the cancel"
        deadline = time.monotonic() + 120
        while lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        stopped = len(steps)  # final: the run's generate() has come back, so no token can follow
        assert not lock.locked()  # the model is free for the next visitor
        assert stopped < 512  # stopped by the cancel, well before the 512 tokens asked (it gives all 512 otherwise)
        assert all(steps)  # and no token was computed after the run let go of the model
    finally:
        hook.remove()
        client.close()
        monkeypatch.undo()
    assert good_request(served)["answer"] is not None


def bomb(path: Path, side: int) -> None:
    """A complete, valid greyscale PNG of side x side black pixels: a few hundred kB that inflate to side² bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    squeeze = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the pixels
    data = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_abuse_gets_its_message_and_the_next_request_works(served, explorer, tmp_path, monkeypatch):
    client = Client(served, verbose=False)
    try:
        huge, bombed = tmp_path / "huge.png", tmp_path / "bomb.png"
        bomb(huge, 20000)  # past PIL's own guard
        bomb(bombed, 12000)  # under PIL's guard, over ours
        assert bombed.stat().st_size < 1_000_000 and huge.stat().st_size < 2_000_000
        big = tmp_path / "big.png"
        big.write_bytes(bytes(50 * 2**20))
        cases = [
            (dict(image=handle_file(str(huge))), AppError, "huge.png is too large: over 100 megapixels"),
            (dict(image=handle_file(str(bombed))), AppError, "bomb.png is too large: 12000x12000 is 144 megapixels"),
            (dict(image=handle_file(str(big))), AppError, "big.png is too large: 52 MB, the limit for it is 20 MB"),
            (dict(image=handle_file(COFFEE), prompt="why " * 25_000), AppError, "at most 20000 are taken"),
        ]
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                client.predict(**kwargs, api_name="/explore")
            assert good_request(served)["table"]["data"][0][1] == "428"

        def no_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        monkeypatch.setattr(explorer.backend().model, "generate", no_memory)
        with pytest.raises(AppError, match="out of memory on cpu; try a smaller budget, image or model"):
            client.predict(image=handle_file(COFFEE), api_name="/explore")
        monkeypatch.undo()
        assert good_request(served)["answer"] is not None
    finally:
        client.close()


def test_an_upload_over_the_limit_is_refused_by_the_server_itself(explorer, tmp_path, monkeypatch):
    """The server's limit is a video's (500 MB, `MAX_VIDEO_BYTES`); served here with a 10 MB one, so that
    the test need not send 500 MB: an 11 MB upload never reaches the app."""
    from explorer.engine.video import MAX_VIDEO_BYTES

    assert app.UPLOAD_LIMIT == f"{MAX_VIDEO_BYTES // 1_000_000}mb"
    monkeypatch.setattr(app, "UPLOAD_LIMIT", "10mb")
    demo, url = app.serve(explorer, queue_size=4, prevent_thread_lock=True, quiet=True)
    try:
        big = tmp_path / "big.mp4"
        big.write_bytes(bytes(11 * 10**6))
        with big.open("rb") as f:
            response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.mp4", f, "video/mp4")}, timeout=60)
        assert response.status_code == 413 and "File size exceeded maximum allowed size" in response.text
    finally:
        demo.close()


def test_the_operator_sets_model_device_host_port_and_queue_by_flags_or_environment(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        app, "serve", lambda explorer, queue, **launch: seen.update(explorer=explorer, queue=queue, **launch)
    )
    monkeypatch.setenv("EXPLORER_MODEL", "tiny-llava-next")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    app.main(["--device", "cpu", "--queue", "4"])
    assert (seen["explorer"].model, seen["explorer"].device, seen["queue"]) == ("tiny-llava-next", "cpu", 4)
    assert (seen["server_name"], seen["server_port"]) == ("0.0.0.0", 7999)
    app.main(["--model", "elsewhere/model", "--host", "127.0.0.1", "--port", "8001"])
    assert (seen["explorer"].model, seen["server_name"], seen["server_port"]) == ("elsewhere/model", "127.0.0.1", 8001)


def test_with_no_model_named_and_no_network_the_app_serves_its_familys_tiny_model_and_says_why(monkeypatch, tmp_path):
    """`python app.py` with neither --model nor EXPLORER_MODEL, on a CPU machine without network (the tests
    set HF_HUB_OFFLINE) whose Hugging Face cache lacks the default SmolVLM-256M-Instruct: the page works on
    tiny-idefics3 (random weights, SmolVLM-256M's geometry), says why and how to load a real model, and bad
    input still gets one message."""
    import huggingface_hub

    monkeypatch.delenv("EXPLORER_MODEL", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # an empty cache
    launched = {}
    serve = app.serve

    def launch(explorer, queue_size, **options):  # as main() launches it, without blocking the test
        launched["explorer"] = explorer
        launched["demo"], launched["url"] = serve(explorer, queue_size, prevent_thread_lock=True, quiet=True)

    monkeypatch.setattr(app, "serve", launch)
    app.main(["--device", "cpu"])
    assert launched["explorer"].model == "tiny-idefics3"
    client = Client(launched["url"], verbose=False)
    try:
        status = client.predict(api_name="/status")
        assert "**random weights**" in status and "HuggingFaceTB/SmolVLM-256M-Instruct" in status
        assert "not in the Hugging Face cache" in status and "--model or set EXPLORER_MODEL" in status
        out = dict(zip(OUTPUTS, client.predict(image=handle_file(COFFEE), max_new_tokens=2, api_name="/explore")))
        assert Image.open(out["overlay_0"]).size == (600, 400)
        rows = {row[0]: row[1:] for row in out["table"]["data"]}
        assert rows["visual tokens"] == ["166", "832", "0.20x"]  # 13 tiles of 64 tokens, 20% kept
        with pytest.raises(AppError, match="prompt is empty"):
            client.predict(image=handle_file(COFFEE), prompt=" ", api_name="/explore")
        again = dict(zip(OUTPUTS, client.predict(image=handle_file(COFFEE), max_new_tokens=1, api_name="/explore")))
        assert again["answer"] is not None
    finally:
        client.close()
        launched["demo"].close()


def test_a_model_the_operator_names_never_falls_back(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # an empty cache
    seen = {}
    monkeypatch.setattr(app, "serve", lambda explorer, queue, **launch: seen.update(explorer=explorer))
    monkeypatch.setenv("EXPLORER_MODEL", "HuggingFaceTB/SmolVLM-256M-Instruct")
    app.main(["--device", "cpu"])
    explorer = seen["explorer"]
    assert explorer.model == "HuggingFaceTB/SmolVLM-256M-Instruct" and not explorer.notice
    status = explorer.status()
    assert "could not be loaded" in status and "Without network" in status and "**random weights**" not in status
