"""The live preview against a run, through the app's API: how long /preview takes once the image's vision
pass is cached, next to one /explore run of the same image.

    python docs/bench/preview.py [--models tiny-llava-next,small-llava-next] [--image assets/coffee.jpg]
        [--methods hired,cls,visionzip,divprune] [--steps 15] [--runs 3] [--max-new-tokens 64] [--browser]

For each model, the app is served in this process (on the CPU unless --device says otherwise) and
called with gradio_client, one call at a time, as a page would: /explore with the method at 20%
(the full run off, `--max-new-tokens` tokens) `--runs` times, then for each method /preview once (the
first on this image, with the vision pass unless an earlier method's pass holds its signals) and
`--steps` more times at other budgets. The times are wall-clock seconds around `predict`, so they
include the HTTP round trip, the queue and Gradio's processing; "handler" is the same steps timed in
this process around `ui.picture.live_picture` alone, and "/status" the round trip of an endpoint that does
no work. With --browser, Debian's headless Chromium then opens the page, picks the image and presses
the right arrow key on the budget slider `--steps` times (hired, the page's default): from the key
press to the picture redrawn, the page's own work included. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from ui.picture import live_picture  # noqa: E402
from ui.session import Session  # noqa: E402


def timed(client: Client, **asked) -> tuple[float, object]:
    """Seconds for one call of the app through `client`, and what it returned."""
    start = time.perf_counter()
    out = client.predict(**asked)
    return time.perf_counter() - start, out


def measure(model: str, device: str | None, image: Path, methods: list[str], args) -> list[dict]:
    explorer = Session(model, device)
    explorer.backend()  # loaded and warmed up before anything is timed
    demo, url = app.serve(explorer, prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False, download_files=False)  # the pictures of a run stay on the server
    file = handle_file(str(image))
    try:
        runs = []
        for _ in range(args.runs):
            seconds, _ = timed(
                client, image=file, method=methods[0], budget=20, compare=False,
                max_new_tokens=args.max_new_tokens, api_name="/explore",
            )  # fmt: skip
            runs.append(seconds)
        explore = statistics.median(runs)
        rows = []
        budgets = [(7 + 13 * i) % 95 + 5 for i in range(args.steps)]  # 5..99%, spread out, none twice in a row
        for method in methods:
            first, (value, _) = timed(client, image=file, method=method, budget=20, api_name="/preview")
            steps, handler = [], []
            for budget in budgets:
                seconds, (value, _) = timed(client, image=file, method=method, budget=budget, api_name="/preview")
                steps.append(seconds)
            for budget in budgets:
                start = time.perf_counter()
                live_picture(explorer, False, image={"path": str(image)}, method=method, budget=budget)
                handler.append(time.perf_counter() - start)
            status = [timed(client, api_name="/status")[0] for _ in budgets]
            rows.append(
                {
                    "model": model,
                    "tokens": value["n"],
                    "method": method,
                    "explore_s": explore,
                    "first_s": first,
                    "median_ms": 1000 * statistics.median(steps),
                    "max_ms": 1000 * max(steps),
                    "ratio": statistics.median(steps) / explore,
                    "handler_ms": 1000 * statistics.median(handler),
                    "status_ms": 1000 * statistics.median(status),
                }
            )
        if args.browser:
            steps = browser_steps(url, image, args.steps)
            print(f"{model}: key press to picture redrawn, median {1000 * statistics.median(steps):.0f} ms, "
                  f"max {1000 * max(steps):.0f} ms ({len(steps)} steps)", file=sys.stderr)  # fmt: skip
        return rows
    finally:
        client.close()
        demo.close()


def browser_steps(url: str, image: Path, steps: int) -> list[float]:
    """Seconds from pressing the right arrow key on the budget slider to the picture redrawn, per step."""
    from playwright.sync_api import expect, sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(image))
        expect(page.locator("#picture .tdx-count")).to_contain_text("(20%)", timeout=120_000)
        slider = page.get_by_label("range slider for Budget: % of the visual tokens")
        slider.focus()
        drawn = "n => +document.querySelector('#picture [data-draws]').dataset.draws > n"
        seconds = []
        for _ in range(steps):
            before = int(page.locator("#picture [data-draws]").get_attribute("data-draws"))
            start = time.perf_counter()
            slider.press("ArrowRight")
            page.wait_for_function(drawn, arg=before, polling=5)
            seconds.append(time.perf_counter() - start)
            page.wait_for_timeout(100)
        browser.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llava-next,small-llava-next")
    parser.add_argument("--image", default=str(ROOT / "assets" / "coffee.jpg"))
    parser.add_argument("--methods", default="hired,cls,visionzip,divprune")
    parser.add_argument("--steps", type=int, default=15, help="previews after the first, at other budgets")
    parser.add_argument("--runs", type=int, default=3, help="/explore runs; their median is the reference")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--browser", action="store_true", help="also time budget steps in a real browser")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {args.device}; image {Path(args.image).name}")
    print("| model | visual tokens | method | /explore (s) | first /preview (s) | /preview after it, median (ms) "
          "| max (ms) | median / explore | handler, median (ms) | /status, median (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for r in measure(model, args.device, Path(args.image), methods, args):
            print(
                f"| {r['model']} | {r['tokens']} | {r['method']} | {r['explore_s']:.2f} | {r['first_s']:.2f} "
                f"| {r['median_ms']:.0f} | {r['max_ms']:.0f} | {r['ratio']:.3f} | {r['handler_ms']:.0f} "
                f"| {r['status_ms']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
