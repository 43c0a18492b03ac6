"""The token-drop explorer app: upload an image, pick a method and a budget, see what was kept and
what it saved, reduced and full side by side. The page is the `ui` package; this file parses the
arguments, builds it and serves it.

    python app.py [--model HUB_ID_OR_FOLDER] [--device cpu|cuda] [--host 0.0.0.0] [--port 7860]
"""

from __future__ import annotations

try:  # Hugging Face ZeroGPU: imported before anything touches CUDA (`ui.session.GPU` uses it)
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse
import os
import threading

import gradio as gr

import backends
from ui import build
from ui.session import ZERO_GPU, Session

UPLOAD_LIMIT = "500mb"  # a video's (`explorer.engine.video.MAX_VIDEO_BYTES`), refused by the server before anything
# is decoded; an image over 20 MB is refused by the app (`ui.request.IMAGE_BYTES`)
CSS = "#examples th { white-space: normal; }"  # the examples' headers wrap, so the table fits a phone


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="The token-drop explorer app.")
    parser.add_argument(
        "--model",
        default=env("EXPLORER_MODEL"),
        help="Hub id, local folder, or a random-weight tiny-* model such as tiny-llava-next; visitors cannot change "
        "it (default: $EXPLORER_MODEL, else for the hardware: LLaVA-NeXT 7B on a GPU with 20 GiB free, "
        f"LLaVA-OneVision 0.5B on a smaller one, SmolVLM-256M without a GPU; on ZeroGPU {backends.DEFAULT_MODEL}; "
        "without network, when that default is not in the Hugging Face cache, its family's tiny-* model)",
    )
    parser.add_argument(
        "--device", default=env("EXPLORER_DEVICE"), help="cpu, cuda, ... (default: cuda if there is one)"
    )
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--queue", type=int, default=32, help="requests that may wait; more are told to try again")
    parser.add_argument(
        "--eval-dir", default=env("EXPLORER_EVAL_DIR"), help="a folder of `python -m explorer eval` results to show"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # ZeroGPU hands out a big GPU per request, none at start-up: its model is the one the Space preloads
    choice = backends.choose(args.model or (backends.DEFAULT_MODEL if ZERO_GPU else None), args.device)
    session = Session(choice.model, args.device, warm_up=not ZERO_GPU, notice=choice.reason)
    if ZERO_GPU:  # ZeroGPU wants the model on the device at start-up; the GPU work happens in the handlers
        session.backend()
    else:  # start loading before the first visitor comes
        threading.Thread(target=session.status, daemon=True).start()
    serve(session, args.queue, eval_dir=args.eval_dir, server_name=args.host, server_port=args.port)


def serve(session: Session, queue_size: int = 32, eval_dir: str | None = None, **launch) -> tuple[gr.Blocks, str]:
    """Build the app and start serving it, uploads over UPLOAD_LIMIT refused; returns it and its URL. The
    browser keeps no record of runs: writing every preview step's outputs to its storage would cost
    ~150 ms a step (measured), and a run's pictures fill the storage quota."""
    demo = build(session, queue_size, eval_dir)
    _, url, _ = demo.launch(max_file_size=UPLOAD_LIMIT, run_history=False, css=CSS, **launch)
    return demo, url


if __name__ == "__main__":
    main()
