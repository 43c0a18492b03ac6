"""python -m explorer run | methods | models | bench | eval"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import typing
from pathlib import Path

from PIL import Image

from .core import Budget, ExplorerError
from .engine import fidelity
from .engine.images import load_image
from .engine.pipeline import check_media, check_request, prepare, run, stream
from .engine.video import MAX_FRAMES, Clip, load_video
from .evaluation import bench
from .methods import KINDS, METHODS, make, on_images, unavailable
from .views.visual import save_chart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m explorer", description="See what visual-token reduction keeps and saves."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _run_parser(commands)
    commands.add_parser("methods", help="list the reduction methods")
    models = commands.add_parser(
        "models", help="the model families: default checkpoints, visual tokens per image, methods that run"
    )
    models.add_argument(
        "--sizes", default="336x336,672x672,1024x768,1920x1080", help="image sizes WIDTHxHEIGHT, comma-separated"
    )
    _bench_parser(commands)
    _eval_parser(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            return _methods()
        if args.command == "models":
            return _models(args.sizes)
        if args.command == "run":
            return _run(args)
        if args.command == "eval":
            return _eval(args)
        return _bench(args)
    except ExplorerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run_parser(commands) -> None:
    run = commands.add_parser("run", help="answer one prompt about one image with one method and budget")
    _model_args(run)
    run.add_argument("--prompt", required=True)
    run.add_argument("--method", default="hired", help="see `python -m explorer methods` (default: hired)")
    amount = run.add_mutually_exclusive_group()
    amount.add_argument(
        "--budget",
        type=float,
        default=0.2,
        help="fraction of the visual tokens to keep (default 0.2); for a method inside the LLM, the mean over its "
        "layers unless --set budget_after_cuts=true",
    )
    amount.add_argument("--tokens", type=int, help="number of visual tokens to keep (the same way)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting, e.g. alpha=0.3")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a token before giving up")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument(
        "--fidelity", action="store_true", help="also run the full model and score its answer under the reduced one"
    )
    run.add_argument(
        "--project-to",
        metavar="HUB_ID",
        help="also compute the cost of this run on a real checkpoint's architecture stored in backends/configs/ "
        "(of the model's family; default on a random-weight model: its family's published checkpoint)",
    )


def _bench_parser(commands) -> None:
    sweep = commands.add_parser(
        "bench", help="time methods x budgets against the unreduced run and the floor, per model, size and batch"
    )
    _model_args(sweep, several=True)
    sweep.add_argument("--prompt", default="Describe this image in detail.")
    sweep.add_argument("--methods", help="comma-separated (default: every method that runs on the model)")
    sweep.add_argument("--budgets", default="1,0.4,0.2,0.1", help="comma-separated fractions")
    sweep.add_argument("--max-new-tokens", type=int, default=32, help="every run generates exactly this many")
    sweep.add_argument("--repeats", type=int, default=3, help="measured runs per cell; medians are reported")
    sweep.add_argument("--warmup", type=int, default=1, help="unmeasured runs per cell first")
    sweep.add_argument("--sizes", help="resize the image to each WIDTHxHEIGHT, comma-separated (default: as it is)")
    sweep.add_argument("--batch", default="1", help="batch sizes, comma-separated: copies of the image per call")
    sweep.add_argument(
        "--no-floor", action="store_true", help="skip the floor runs (uniform, keeping as many tokens as each cell)"
    )
    sweep.add_argument("--csv", default="bench.csv", help="where to write the rows (default: bench.csv)")
    sweep.add_argument(
        "--plot",
        default="bench.html",
        help="chart of TTFT, peak memory and FLOPs against tokens kept (default: bench.html); a PNG is written "
        "beside it when kaleido can find Chrome or Chromium",
    )


def _eval_parser(commands) -> None:
    grid = commands.add_parser(
        "eval",
        help="accuracy at a budget: methods x budgets on lmms-eval tasks or a local folder (see docs/EVAL.md)",
    )
    grid.add_argument("--model", required=True, help="Hub id, local folder or a random-weight tiny-* model")
    what = grid.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="lmms-eval tasks, comma-separated, e.g. textvqa_val,pope,gqa")
    what.add_argument("--dataset", help="a folder with data.jsonl: id, image, question, answers (one a line)")
    grid.add_argument("--methods", default="hired", help="comma-separated (default: hired); none runs anyway")
    amount = grid.add_mutually_exclusive_group()
    amount.add_argument("--budgets", default="0.2,0.1,0.05", help="fractions, comma-separated (default 0.2,0.1,0.05)")
    amount.add_argument("--tokens", help="numbers of visual tokens, comma-separated, instead of fractions")
    grid.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, for every method that has it"
    )
    grid.add_argument("--max-new-tokens", type=int, help="instead of each task's own answer length")
    grid.add_argument("--limit", type=int, help="at most this many questions per task")
    grid.add_argument(
        "--frames",
        type=int,
        help="frames sampled evenly from each video (default: 8 on a CPU, 16 on a GPU; at most 64)",
    )
    grid.add_argument("--output", default="eval", help="folder for the results; a cell already there is reused")
    grid.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when there is one)")
    grid.add_argument(
        "--random-weights", action="store_true", help="--model's architecture with random weights (see bench)"
    )


def _model_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    parser.add_argument(
        "--model",
        help="Hub id, local folder or a random-weight tiny-* model such as tiny-llava-next (default: for the "
        "hardware: LLaVA-NeXT 7B on a GPU with 20 GiB free, LLaVA-OneVision 0.5B on a smaller one, SmolVLM-256M "
        "without a GPU; without network, when that default is not in the Hugging Face cache, its family's tiny-* "
        "model)" + ("; several, comma-separated, are measured one after another" if several else ""),
    )
    shown = parser.add_mutually_exclusive_group(required=True)
    shown.add_argument("--image")
    shown.add_argument("--video", help="a video file (mp4, webm, mov, mkv, animated gif); its audio is ignored")
    counts = "; several, comma-separated, are measured one after another" if several else ""
    parser.add_argument(
        "--frames",
        type=str if several else int,
        help=f"frames sampled evenly from --video (default: 8 on a CPU, 16 on a GPU; at most 64){counts}",
    )
    parser.add_argument("--fps", type=float, help="frames sampled from --video at this rate instead (at most 64)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when there is one)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build --model's architecture from the config stored in backends/configs/, with random weights, "
        "instead of downloading it: real speed and memory, gibberish answers",
    )


def _methods() -> int:
    for name, method in METHODS.items():
        defaults = ", ".join(f"{k}={v}" for k, v in vars(method()).items())
        print(f"{name:10} {method.summary}" + (f"  [{defaults}]" if defaults else ""))
    return 0


def _models(sizes: str) -> int:
    """A markdown table of the families, measured on their random-weight tiny-* models, which have the
    real processors' geometry: the token counts are the real checkpoints'."""
    shapes = _sizes(sizes)
    import backends

    _quiet()
    columns = ["family", "model type", "default checkpoint", "random-weight model"]
    columns += [f"tokens at {w}x{h}" for w, h in shapes]
    print("| " + " | ".join([*columns, "methods that cannot run"]) + " |\n|" + "---|" * (len(columns) + 1))
    for preset in (name for name in backends.RANDOM if name.startswith("tiny-")):
        backend = backends.load(preset, "cpu")
        counts = [str(len(backend.layout([h, w])[0])) for w, h in shapes]
        cannot = ", ".join(f"`{m}`" for m in on_images() if unavailable(m, backend)) or "none"
        names = [backend.family, f"`{backend.model_type}`", f"`{backend.default}`", f"`{preset}`"]
        print("| " + " | ".join([*names, *counts, cannot]) + " |")
    return 0


def _sizes(sizes: str) -> list[tuple[int, int]]:
    shapes = [size.split("x") for size in sizes.split(",")]
    if not all(len(shape) == 2 and all(x.isdigit() and 0 < int(x) <= 10_000 for x in shape) for shape in shapes):
        raise ExplorerError(f"--sizes takes WIDTHxHEIGHT,... such as 672x672,1920x1080 (at most 10000); got {sizes!r}")
    return [(int(w), int(h)) for w, h in shapes]


def _load(args, model: str | None = None):
    import backends  # imports transformers: only once the arguments are known to be good

    _quiet()
    choice = backends.choose(model or args.model, args.device, args.random_weights)
    if choice.reason:
        print(f"notice: {choice.reason}", file=sys.stderr)
    return backends.load(choice.model, args.device, args.random_weights)


def _run(args) -> int:
    settings = _settings(args.method, args.set)
    make(args.method, **settings)
    budget = Budget(tokens=args.tokens) if args.tokens is not None else Budget(fraction=args.budget)
    check_request(args.prompt, args.max_new_tokens, timeout_s=args.timeout)
    image = _media(args)
    backend = _load(args)
    shown = ""
    for result in stream(
        backend,
        image,
        args.prompt,
        args.method,
        budget,
        settings,
        args.max_new_tokens,
        timeout_s=args.timeout,
        project_to=args.project_to,
    ):
        text = result.answer.rstrip("\ufffd")  # hold back a character still being decoded
        if not args.json and text.startswith(shown):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    drift = _drift(backend, image, args, settings, budget) if args.fidelity else None
    if args.json:
        print(json.dumps(result.to_json() | ({"fidelity": drift} if drift else {}), indent=2))
    else:
        print("\n\n" + _summary(result))
        if drift:
            first = drift["first_divergence"]
            print(
                f"drift on the full answer: log-prob/token {drift['logprob']:.3f} vs {drift['full_logprob']:.3f} "
                f"({drift['logprob_diff']:+.3f}), KL {drift['kl']:.4f}/token, "
                f"greedy choices part {'never' if first is None else f'at token {first}'}"
            )
    return 0


def _media(args):
    """The image, or the frames sampled from the video, of the command line: checked before any model loads."""
    if args.video is None:
        if args.frames is not None or args.fps is not None:
            raise ExplorerError("--frames and --fps sample a video: give --video, not --image")
        return load_image(args.image)
    import torch

    from .engine.video import load_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_video(args.video, frames=args.frames, fps=args.fps, device=device)


def _drift(backend, image, args, settings, budget) -> dict:
    """The full run's answer scored under the full and the reduced model (`fidelity.drift`)."""
    full = run(backend, image, args.prompt, "none", max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
    theirs = fidelity.logprobs(backend, image, args.prompt, full.answer_ids)
    mine = fidelity.logprobs(backend, image, args.prompt, full.answer_ids, args.method, budget, settings)
    return fidelity.drift(mine, theirs, full.answer_ids)


def _summary(result) -> str:
    tok, timing = result.tokens, result.timing
    weights = " (random weights: the answer is gibberish)" if result.random_weights else ""
    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items())
    parts = "  ".join(f"{p['name']} {p['kept']}/{p['full']}" for p in tok["by_partition"])
    if "by_frame" in tok:  # a clip: per frame, with its time
        parts = "  ".join(f"{f['time_s']:.1f}s {f['kept']}/{f['full']}" for f in tok["by_frame"])
    decode = timing["decode_tokens_per_s"]
    cuts = ", ".join(f"{c['kept']} from layer {c['layer']} (scored at {c['scored_at']})" for c in tok["llm_cuts"])
    inside = [f"inside the LLM: {cuts}; visual tokens per layer, averaged: {tok['visual_layer_mean']:.1f}"]
    if result.settings.get("rerank"):
        inside.append("decode without a KV cache, the tokens chosen again at every new token (slow: the paper's mode)")
    meaning = ""
    if cuts and result.budget:
        after = result.settings.get("budget_after_cuts")
        meaning = " (left after the last cut)" if after else " (visual tokens per LLM layer, averaged)"
    return "\n".join(
        [
            f"{result.model}{weights}: {result.method} ({settings or 'no settings'}), "
            f"budget {result.budget or ('adaptive' if tok['adaptive'] else 'none')}{meaning}",
            f"visual tokens kept {tok['visual_kept']} of {tok['visual_full']} ({parts}); text {tok['text']}; generated {tok['generated']}",
            *(inside if cuts else []),
            f"first token {timing['ttft_s']:.3f} s | prefill {timing['prefill_s']:.3f} s | "
            f"decode {f'{decode:.1f} tok/s' if decode else '-'} | total {timing['total_s']:.3f} s | selection {timing['selection_s'] * 1e3:.2f} ms",
            f"peak memory ({result.memory['device']}): {result.memory['peak_bytes'] / 2**20:.0f} MiB",
            f"computed from the config: vision {result.cost['vision_flops'] / 1e12:.3g} TFLOPs, "
            f"LLM prefill {result.cost['prefill_flops'] / 1e12:.3g} TFLOPs, "
            f"the prompt's KV cache while decoding {result.cost['kv_bytes'] / 2**20:.1f} MiB",
            *_projected(result.cost.get("projected")),
        ]
    )


def _projected(projected: dict | None) -> list[str]:
    """The summary's line on the run's computed cost on a real architecture, reduced vs full."""
    if projected is None:
        return []
    reduced, full = projected["reduced"], projected["full"]

    def pair(key: str, scale: float, unit: str, form: str = ".3g") -> str:
        return f"{reduced[key] / scale:{form}} vs {full[key] / scale:{form}} {unit}"

    return [
        f"computed for {projected['model']} ({projected['dtype']}), reduced vs full: "
        f"vision {pair('vision_flops', 1e12, 'TFLOPs')}, LLM prefill {pair('prefill_flops', 1e12, 'TFLOPs')}, "
        f"KV cache {pair('kv_bytes', 2**20, 'MiB', '.0f')}, weights {full['weight_bytes'] / 2**30:.2f} GiB"
    ]


def _bench(args) -> int:
    methods = [m for m in (args.methods or "").split(",") if m]
    for name in methods:
        make(name)
    try:
        budgets = [Budget(fraction=float(b)) for b in args.budgets.split(",") if b]
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        raise ExplorerError(
            f"--budgets takes fractions and --batch whole numbers, got {args.budgets!r}, {args.batch!r}"
        ) from None
    if args.repeats < 1 or args.warmup < 0 or not batches or not all(1 <= b <= 256 for b in batches):
        raise ExplorerError("--repeats must be at least 1, --warmup at least 0 and each --batch 1 to 256")
    check_request(args.prompt, args.max_new_tokens, args.max_new_tokens)
    if args.video is not None and (args.sizes or batches != [1]):
        raise ExplorerError("a video is measured one clip a run, at its own size: --sizes and --batch are for images")
    pictures = _pictures(args)
    groups, measured = {}, []  # "model WxH batch B" -> its rows (for the charts); every row (for the CSV)
    for model in args.model.split(",") if args.model else [None]:  # None: the hardware's default
        backend = _load(args, model)
        runs = methods or _runnable(backend, pictures[0].picture if args.video else None, args.prompt)
        for shown, batch in itertools.product(pictures, batches):
            picture, (width, height) = shown.picture, shown.size
            name = f"{backend.name} {shown.label} batch {batch}"
            print(f"\n{name}", flush=True)
            done = {}
            rows = bench.sweep(
                backend, picture, args.prompt, runs, budgets, args.max_new_tokens, args.repeats, args.warmup,
                done, batch=batch, floor=not args.no_floor,
            )  # fmt: skip
            floors = [row for (method, *_), row in done.items() if method == "uniform" and row not in rows]
            for row in rows + floors:
                row.update(model=backend.name, size=f"{width}x{height}", frames=shown.frames)
            print(bench.table(rows + floors), flush=True)  # the floors last, their budget a count of tokens
            groups[name] = rows
            measured += rows + floors
        del backend
        _release()
    bench.write_csv(measured, args.csv)
    print(f"\nwrote {args.csv}")
    try:
        figure = bench.charts(groups)
    except ImportError as error:  # plotly: installed with the app, maybe not where only the bench runs
        print(f"wrote no chart ({error}: pip install plotly)")
        return 0
    png = str(Path(args.plot).with_suffix(".png"))
    if (why := save_chart(figure, args.plot)) is None:
        print(f"wrote {args.plot} and {png}")
    else:
        print(f"wrote {args.plot}; no PNG ({why}: pip install kaleido, and Chrome or Chromium)")
    return 0


class Shown(typing.NamedTuple):
    """What one group of a bench's rows is measured on: the image at one size, or a clip of some frames."""

    label: str  # "672x672", "8 frames 640x360"
    picture: Image.Image | Clip
    size: tuple[int, int]  # (width, height)
    frames: int | None  # frames sampled, for a clip


def _pictures(args) -> list[Shown]:
    """The image at each of --sizes, or the clip of each of --frames (or at --fps), checked before any model loads."""
    if args.video is None:
        if args.frames is not None or args.fps is not None:
            raise ExplorerError("--frames and --fps sample a video: give --video, not --image")
        image = load_image(args.image)
        sizes = _sizes(args.sizes) if args.sizes else [image.size]
        resized = [image if size == image.size else image.resize(size) for size in sizes]
        return [Shown(f"{w}x{h}", picture, (w, h), None) for picture, (w, h) in zip(resized, sizes)]
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        counts = [int(n) for n in args.frames.split(",") if n] if args.frames else []
    except ValueError:
        raise ExplorerError(f"--frames takes whole numbers, comma-separated, got {args.frames!r}") from None
    shown = []
    for count in counts or [None]:  # None: the default for the device, or --fps
        clip = load_video(args.video, frames=count, fps=args.fps, device=device)
        w, h = clip.size
        shown.append(Shown(f"{len(clip.frames)} frames {w}x{h}", clip, clip.size, len(clip.frames)))
    return shown


def _eval(args) -> int:
    """The grid of `python -m explorer eval` (explorer/evaluate.py), checked before lmms-eval is imported."""
    methods = [m for m in args.methods.split(",") if m]
    settings = _grid_settings(methods, args.set)
    try:
        budgets = (
            [Budget(tokens=int(t)) for t in args.tokens.split(",") if t]
            if args.tokens
            else [Budget(fraction=float(b)) for b in args.budgets.split(",") if b]
        )
    except ValueError:
        got = args.tokens or args.budgets
        raise ExplorerError(f"--budgets takes fractions and --tokens whole numbers, got {got!r}") from None
    if not budgets and any(m != "none" for m in methods):
        raise ExplorerError("give at least one budget")
    if args.limit is not None and args.limit < 1 or args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ExplorerError("--limit and --max-new-tokens must be at least 1")
    if args.max_new_tokens is not None:
        check_request("-", args.max_new_tokens)
    if args.frames is not None and not 1 <= args.frames <= MAX_FRAMES:
        raise ExplorerError(f"--frames must be from 1 to {MAX_FRAMES}, got {args.frames}")
    from .evaluation import evaluate  # lmms-eval: seconds to import, so only now

    evaluate.logs_to_stderr()
    _quiet()
    tasks = tuple(t for t in (args.tasks or "").split(",") if t)
    grid = evaluate.Grid(
        args.model, evaluate.cells(methods, budgets, settings), Path(args.output), tasks, args.dataset,
        args.limit, args.max_new_tokens, args.device, args.random_weights, args.frames,
    )  # fmt: skip
    evaluate.run(grid)
    return 0


def _grid_settings(methods: list[str], pairs: list[str]) -> dict[str, dict]:
    """--set KEY=VALUE pairs for every method of the grid that has KEY, each read as that method's type."""
    for name in methods:
        make(name)
    if bad := [pair for pair in pairs if "=" not in pair]:
        raise ExplorerError(f"--set takes KEY=VALUE, got {bad[0]!r}")
    keys = [pair.partition("=")[0] for pair in pairs]
    fields = {m: {f.name for f in dataclasses.fields(METHODS[m])} for m in methods}
    unused = [key for key in keys if not any(key in names for names in fields.values())]
    if unused:
        raise ExplorerError(f"no method of {', '.join(methods)} has the setting {', '.join(unused)}")
    return {m: _settings(m, [p for p, k in zip(pairs, keys) if k in fields[m]]) for m in methods}


def _runnable(backend, clip: Clip | None = None, prompt: str = "") -> list[str]:
    """Every method that runs on this model (on this video clip, when given); the others say why on stderr."""
    if clip is None:
        skipped = {m: unavailable(m, backend) for m in on_images() if m not in ("none", "uniform")}
    else:
        geometry = prepare(backend, clip, prompt).geometry
        skipped = {m: _on_clip(m, backend, geometry) for m in METHODS if m not in ("none", "uniform")}
    for reason in filter(None, skipped.values()):
        print(f"skipped: {reason}", file=sys.stderr)
    return [m for m, reason in skipped.items() if not reason]


def _on_clip(name: str, backend, geometry) -> str | None:
    """Why the method `name` cannot run on a clip of this `geometry` with the backend's model; None when it can."""
    if reason := unavailable(name, backend, clip=True):
        return reason
    try:
        check_media(make(name), geometry)
    except ExplorerError as error:
        return f"{name}: {error}"
    return None


def _release() -> None:
    """Give a model's memory back before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _settings(method: str, pairs: list[str]) -> dict:
    """--set key=value pairs, each value read as its setting's type."""
    types = typing.get_type_hints(METHODS[method]) if method in METHODS else {}
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ExplorerError(f"--set takes KEY=VALUE, got {pair!r}")
        kind = types.get(key, str)
        try:
            if kind is bool:
                settings[key] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[
                    text.lower()
                ]
            else:
                settings[key] = kind(text) if kind in (int, float) else text
        except (KeyError, ValueError):
            raise ExplorerError(f"{method}: {key} must be {KINDS[kind]}, got {text!r}") from None
    return settings


def _quiet() -> None:
    """Keep the terminal for the answer: no progress bars or info logs from transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
