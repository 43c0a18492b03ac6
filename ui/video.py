"""Video: a clip in place of the image. The clip's frames, sampled as transformers samples them
(`explorer.engine.video`), go through the model's video processor; the picture shows one frame (or temporal
group) at a time with a slider and a play button, over a strip of every frame with its kept count, a chart
of the kept tokens per frame and the waterfall of the counts from frames to the LLM's layers. The picture
follows the budget with no LLM run, from the clip's cached vision pass (`Session.clips`); Run answers with
the reduced and the full model side by side, with the numbers and the drift, as for an image.
`/video_preview`, `/video_frame`, `/video` and `/video_methods`."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import torch

from explorer import ExplorerError, Geometry, make
from explorer.engine.pipeline import check_media
from explorer.engine.video import CPU_FRAMES, GPU_FRAMES, MAX_DURATION_S, MAX_FRAMES, MAX_VIDEO_BYTES, default_frames
from explorer.methods import METHODS, unavailable
from explorer.views import clip as clips
from explorer.views import clip_steps, teach
from explorer.views.preview import preview

from .explore import Downloads, compared, download, downloads
from .form import Form, control
from .picture import LIVE, VIEWER
from .request import NoImage, Request, named, request, setting_name, shows_errors
from .session import GPU, Session, video

TYPES = [".mp4", ".webm", ".mov", ".mkv", ".gif"]
PROMPT = "What moves in this video, and where does it go?"
ONE_FRAME = Geometry(  # the least a clip's geometry is: what `check_media` refuses on a clip, it refuses here
    ("frame 0",), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4), (1, 1)
)
LIMITS = (
    f"mp4, webm, mov, mkv or animated GIF, up to {MAX_VIDEO_BYTES // 1_000_000} MB and {MAX_DURATION_S // 60} "
    f"minutes (an image: up to 20 MB); at most {MAX_FRAMES} frames are sampled. **Audio is ignored**: only the "
    "frames reach the model. Video runs on LLaVA-OneVision (and LLaVA-Video), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, SmolVLM2 and InternVL3. A method's settings are "
    "the left column's (Method settings) for an image method, the Video tab's for a video method."
)
MARK = """(frame) => {
    document.querySelectorAll('#clip-strip figure').forEach((f) => f.classList.toggle('chosen', f.dataset.frame == frame));
}"""


class Inputs(NamedTuple):
    clip: gr.File
    frames: gr.Slider
    prompt: gr.Textbox
    method: gr.Dropdown
    budget: gr.Slider
    go: gr.Button
    stop: gr.Button
    refused: gr.Markdown  # the methods that cannot run on a clip, and why
    settings: dict  # API name -> control, one per setting of every video method (image methods': the left column's)
    play: gr.Button
    timer: gr.Timer
    playing: gr.State


class Shown(NamedTuple):
    """What the video mode updates, in the order `/video` returns them."""

    count: gr.Markdown
    strip: gr.HTML
    viewer: gr.HTML
    frame: gr.Slider
    per_frame: gr.Plot
    waterfall: gr.Plot
    answer: gr.Textbox
    full_answer: gr.Textbox
    table: gr.Dataframe
    drift: gr.HTML
    live: gr.Markdown
    steps: gr.HTML  # what the method did on the clip, in words (`clip_steps.html`)
    decode: gr.Plot  # DyCoke's decode-time cut: visual tokens attended at each decode step, against the cache
    stages: gr.HTML  # where the time went: the run's stages, reduced and full
    shown: gr.State  # what the picture shows: {"key", "geometry", "selection", "line", "note", "pending"}
    memo: gr.State  # the visitor's last MEMO full runs on clips
    ran: gr.State  # the last run, for its report: {"picture" (the clip), "result", "full", "drift"}


def example() -> Path:
    """A 3-second clip of moving shapes over a still background, drawn and encoded with PyAV at first use."""
    import av
    import numpy as np

    path = Path(tempfile.gettempdir()) / "token-drop-explorer" / "shapes.mp4"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:192, 0:256]
    partial = path.with_suffix(".part.mp4")
    with av.open(str(partial), "w") as container:
        stream_ = container.add_stream("mpeg4", rate=8)
        stream_.width, stream_.height, stream_.pix_fmt = 256, 192, "yuv420p"
        for i in range(24):
            frame = np.full((192, 256, 3), (70, 110, 160), dtype=np.uint8)  # sky
            frame[130:] = (60, 140, 60)  # grass: the same in every frame
            frame[10 + 4 * i : 50 + 4 * i, 20 + 8 * i : 60 + 8 * i] = (220, 40, 40)  # a red square, right and down
            frame[(ys - 150) ** 2 + (xs - 230 + 7 * i) ** 2 < 18**2] = (250, 220, 40)  # a yellow ball, to the left
            container.mux(stream_.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream_.encode())
    partial.replace(path)
    return path


def build(session: Session) -> tuple[Inputs, Shown, Downloads]:
    def scene(key: str) -> dict | None:  # the picture asks for each frame's scene once: `server.scene(key)`
        return session.frame_scene(key)

    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            clip = gr.File(label="Clip (upload or drop)", file_types=TYPES, type="filepath", elem_id="clip")
            gr.Markdown(LIMITS)
            frames = gr.Slider(
                1, MAX_FRAMES, value=frame_default(session), step=1, label="Frames sampled",
                info=f"evenly spread over the clip; {CPU_FRAMES} by default on a CPU, {GPU_FRAMES} on a GPU",
            )  # fmt: skip
            prompt = gr.Textbox(label="Prompt", value=PROMPT, lines=2)
            method = gr.Dropdown(choices(None), value="uniform", label="Method (video methods only here)")
            budget = gr.Slider(1, 100, value=20, step=1, label="Budget: % of the clip's visual tokens")
            with gr.Accordion("Video method settings", open=False):
                settings = {
                    setting_name(m, f.name): control(m, f, visible=False)
                    for m, cls in METHODS.items()
                    if "clip" in cls.requires
                    for f in dataclasses.fields(cls)
                }
            with gr.Row():
                go = gr.Button("Run on the clip", variant="primary", scale=3)
                stop = gr.Button("Stop", scale=1)
            refused = gr.Markdown()
            gr.Examples([[str(example()), PROMPT]], [clip, prompt], label="Example clip", elem_id="clip-examples")
            gr.Markdown(teach.TEMPORAL)
        with gr.Column(scale=3, min_width=320):
            count = gr.Markdown("Upload a clip to see its frames and what the method keeps of each.")
            strip = gr.HTML(elem_id="clip-strip")
            steps = gr.HTML(elem_id="clip-steps")
            html = dict(html_template=VIEWER["html"], css_template=VIEWER["css"], js_on_load=VIEWER["js"])
            viewer = gr.HTML(None, **html, apply_default_css=False, server_functions=[scene], elem_id="clip-picture")
            with gr.Row():
                frame = gr.Slider(0, 1, value=0, step=1, label="Frame", scale=4)
                play = gr.Button("▶ Play", scale=1, elem_id="clip-play")
            with gr.Tab("Kept per frame"):
                per_frame = gr.Plot(label="Kept tokens per frame")
            with gr.Tab("Waterfall"):
                waterfall = gr.Plot(label="From frames to the LLM")
            with gr.Tab("Decode: the KV cache"):
                gr.Markdown("After a run of a method that cuts at each decode step (DyCoke): what the cache holds.")
                decode = gr.Plot(label="Visual tokens at each decode step")
            with gr.Row():
                answer = gr.Textbox(label="Reduced answer (clip)", lines=4, interactive=False)
                full_answer = gr.Textbox(label="Full answer (clip)", lines=4, interactive=False)
            drift, live = gr.HTML(), gr.Markdown()
            table = gr.Dataframe(headers=["", "reduced", "full", "reduced / full"], interactive=False, wrap=True)
            times = gr.HTML(label="Where the time goes", elem_id="clip-stages")
            files = downloads()
    asked = Inputs(clip, frames, prompt, method, budget, go, stop, refused, settings, play,
                   gr.Timer(1.0, active=False), gr.State(False))  # fmt: skip
    shown = Shown(count, strip, viewer, frame, per_frame, waterfall, answer, full_answer, table, drift, live, steps,
                  decode, times, gr.State(), gr.State({}), gr.State())  # fmt: skip
    return asked, shown, files


def shown_settings(asked: Inputs, method: str) -> list:
    """Updates that show the Video tab's settings of `method` and hide the others' (in `settings` order)."""
    mine = {setting_name(method, f.name) for f in dataclasses.fields(METHODS[method])} if method in METHODS else set()
    return [gr.update(visible=name in mine) for name in asked.settings]


def frame_default(session: Session) -> int:
    """The frames to sample by default: 8 on a CPU, 16 on a GPU."""
    if session.device is not None:
        return default_frames(session.device)
    return GPU_FRAMES if torch.cuda.is_available() else default_frames("cpu")


def refusal(name: str, backend=None) -> str | None:
    """Why method `name` cannot run on a clip (of the backend's model, when given); None when it can."""
    if backend is not None and (reason := unavailable(name, backend, clip=True)):
        return reason
    try:
        check_media(make(name), ONE_FRAME)
    except ExplorerError as error:
        return str(error)
    return None


def choices(backend) -> list[tuple[str, str]]:
    """The video mode's method picker: every method that runs on a clip, the video ones first."""
    runs = [name for name in METHODS if refusal(name, backend) is None]
    runs.sort(key=lambda name: "clip" not in METHODS[name].requires)
    return [(f"{name}: {METHODS[name].summary}", name) for name in runs]


def for_model(session: Session) -> tuple:
    """The picker for the loaded model, and the methods it cannot run on a clip, with their reasons."""
    runs = session.runnable()
    if runs is None:
        return gr.skip(), gr.skip()
    backend = session.backend()
    reasons = [reason for name in METHODS if (reason := refusal(name, backend))]
    said = "".join(f"\n- {reason}" for reason in reasons)
    return gr.update(choices=choices(backend), value="uniform"), f"Not on a clip:{said}" if said else ""


class Asked(NamedTuple):
    """A request on a clip: the clip in the image's place, and the frames to sample from it."""

    request: Request
    frames: int


class Texts(NamedTuple):
    """The words around the picture: the line over it, the note under it, and whether the tokens are
    chosen later (inside the LLM: the picture shows every one)."""

    line: str
    note: str
    pending: bool


def asked_clip(given: dict, default: int, prompt: bool = False) -> Asked:
    """The request the named values make, with the clip in the image's place, checked (`request.request`),
    and the frames to sample (`default` when not given)."""
    try:
        asked = request({**given, "image": given.get("clip")}, prompt=prompt, limit=MAX_VIDEO_BYTES)
    except NoImage:
        raise NoImage("upload a clip first, or pick the example") from None
    frames = given.get("frames", default)
    if isinstance(frames, float) and frames.is_integer():
        frames = int(frames)  # a slider sends floats
    return Asked(asked, frames)


def drawn(clip, key: str, g, selection, flow: clips.Flow, texts: Texts, frame=0, method="", tokens=None) -> dict:
    """The video mode's pictures of a clip's selection by `method`: the strip, the chosen frame's picture and
    the slider, the per-frame chart, the waterfall and what the method did (with a run's `tokens`: its decode)."""
    frame = min(int(frame or 0), len(g.frames) - 1)
    # no frames in a visitor's state, which outlives the session's bounded caches: the key finds them there
    state = dict(key=key, geometry=g, selection=selection, **texts._asdict())
    counts = clips.frame_counts(clip, g, selection.keep)
    title = f"{len(selection.keep)} of {len(g)} visual tokens kept over {len(clip.frames)} frames"
    return {
        "strip": clips.strip(clip, g, selection, frame, clip_steps.WORDS.get(method, "segment")),
        "steps": clip_steps.html(method, g, selection, tokens) if method else "",
        "viewer": frame_value(state, frame),
        "frame": gr.update(maximum=max(1, len(g.frames) - 1), value=frame, interactive=len(g.frames) > 1),
        "per_frame": clips.per_frame_figure(counts, title),
        "waterfall": clips.waterfall_figure(flow, "From frames to the LLM"),
        "shown": state,
    }


def frame_value(state: dict | None, frame) -> dict | None:
    """The picture's value for frame (or temporal group) `frame` of what is shown."""
    if not state:
        return None
    g = state["geometry"]
    frame = min(int(frame or 0), len(g.frames) - 1)
    p = g.frames[frame]
    return clips.frame_value(
        f"{state['key']} @{frame}", g, state["selection"], p, f"{state['line']} · {g.names[p]} shown", state["note"],
        state["pending"],
    )  # fmt: skip


@shows_errors
def live(session: Session, frame=0, clip=None, **given) -> dict:
    """The preview of the clip at the budget, from its cached vision pass, with no LLM run; a bad clip is said
    in the count line (this runs on every step), a method or budget out of range refused."""
    try:
        asked, frames = asked_clip({**given, "clip": clip}, frame_default(session))
    except NoImage as error:
        return {"count": f"{error}.", "viewer": None, "strip": "", "steps": "", "shown": None}
    try:
        shown, key = video(asked.image, frames), session.clip_key(asked.image, frames)
        backend = session.backend()
        seen = preview(backend, shown, asked.method, asked.fraction, asked.settings, session.clips, key)
    except ExplorerError as error:  # the clip, or the method on it
        return {"count": f"⚠️ {named(str(error), clip)}", "viewer": None, "strip": "", "steps": "", "shown": None}
    patches = session.clips.get(backend, shown, (), key)[0].patches
    entering = len(seen.geometry) if seen.pending else len(seen.selection.keep)
    flow = clips.Flow(len(shown.frames), patches, len(seen.geometry), entering)
    width, height = shown.size
    line = f"{seen.count} · {len(shown.frames)} frames of {width}x{height}, {shown.duration_s:.1f} s"
    count = f"{line}{' · the clip has audio: ignored' if shown.audio else ''}"
    texts = Texts(str(seen.count), seen.note, seen.pending)
    drew = drawn(shown, key, seen.geometry, seen.selection, flow, texts, frame, "" if seen.pending else asked.method)
    return {"count": count, **drew}


def run(session: Session, memo: dict | None = None, frame=0, clip=None, **given):
    """The method on the clip, then the full model unless it ran on this clip, prompt and length before
    (`memo`), then the drift; yields {output name: value} as things change (the names are `Shown`'s)."""
    yield from _run(session, memo or {}, frame, image=clip, **given)


@shows_errors
def _run(session: Session, memo: dict, frame, image=None, **given):
    asked, frames = asked_clip({**given, "clip": image}, frame_default(session), prompt=True)
    shown, key = video(asked.image, frames), session.clip_key(asked.image, frames)

    def pictures(reduced) -> tuple[dict, dict]:
        patches = session.clips.get(session.backend(), shown, (), key)[0].patches
        flow = clips.flow_of(len(shown.frames), patches, reduced.tokens)
        t = reduced.tokens
        where = "after its last cut inside the LLM" if t["llm_cuts"] else "what reached the LLM"
        line = f"{t['visual_kept']} of {t['visual_full']} visual tokens kept (the last run)"
        texts = Texts(line, f"The last run's choice: {where}; move the budget to preview", False)
        g, selection = reduced.geometry, reduced.selection
        drew = drawn(shown, key, g, selection, flow, texts, frame, asked.method, t)
        drew |= {"count": line, "decode": clip_steps.decode_figure(t)}
        return drew, drew

    ran = yield from compared(session, shown, asked, (key, asked.prompt, asked.max_new_tokens), memo, pictures)
    last = {"picture": shown, "result": ran.reduced, "full": ran.full, "drift": ran.drift}
    yield ran.last("drift") | {"ran": last}  # the drift's strip of tokens: "strip" is the frames' here


def gpu_seconds(memo=None, frame=0, **given) -> int:
    """How long a ZeroGPU slot a clip's run asks for: a frame costs about what an image does."""
    frames = int(given.get("frames") or MAX_FRAMES)
    return min(300, 20 + frames * 2 + int(given.get("max_new_tokens", 64)) * 2 // 10)


def next_frame(frame, state: dict | None):
    """The frame after `frame`, back to the first after the last (the play button's step)."""
    if not state:
        return gr.skip()
    return (int(frame or 0) + 1) % len(state["geometry"].frames)


def toggled(playing: bool | None) -> tuple:
    playing = not playing
    return playing, gr.Timer(active=playing), gr.update(value="⏸ Pause" if playing else "▶ Play")


def wire(session: Session, demo: gr.Blocks, form: Form, asked: Inputs, out: Shown, files: Downloads, queue: dict):
    """The preview on every change of clip, frames, method, budget or setting; the frame slider, the play
    button, Run and the last run's report."""
    named_in = dict(clip=asked.clip, frames=asked.frames, method=asked.method, budget=asked.budget)
    named_in |= form.settings | asked.settings  # a video method's settings are the Video tab's
    views = [out.count, out.strip, out.viewer, out.frame, out.per_frame, out.waterfall, out.steps, out.shown]
    by_name = out._asdict()

    def previewed(frame=0, **given):
        changes = live(session, frame, **given)
        return [changes.get(name, gr.skip()) for name in ("count", "strip", "viewer", "frame", "per_frame",
                                                           "waterfall", "steps", "shown")]  # fmt: skip

    changes = [asked.clip.change, asked.frames.change, asked.method.change, asked.budget.change]
    changes += [control.change for control in asked.settings.values()]
    gr.on(changes, previewed, [out.frame], views, inputs_kwargs=named_in, preprocess=False,
          api_name="video_preview", **LIVE)  # fmt: skip
    out.frame.change(frame_value, [out.shown, out.frame], out.viewer, api_name="video_frame", **LIVE)
    out.frame.change(None, out.frame, js=MARK, api_name="video_mark")  # the strip's outline, in the browser
    asked.play.click(toggled, asked.playing, [asked.playing, asked.timer, asked.play], api_name="video_play")
    asked.timer.tick(next_frame, [out.frame, out.shown], out.frame, api_name="video_tick", show_progress="hidden")

    def explore(memo=None, frame=0, **given):
        yield from run(session, memo, frame, **given)

    on_gpu = GPU(explore, duration=gpu_seconds)

    def by_component(memo=None, frame=0, **given):
        for changes in on_gpu(memo, frame, **given):
            yield {by_name[name]: value for name, value in changes.items()}

    everything = named_in | dict(prompt=asked.prompt, max_new_tokens=form.max_new_tokens, compare=form.compare)
    running = asked.go.click(by_component, [out.memo, out.frame], list(out), inputs_kwargs=everything,
                             api_name="video", preprocess=False, **queue)  # fmt: skip
    asked.stop.click(None, cancels=running, api_name="video_stop")
    files.export.click(download, out.ran, files.exported, api_name="video_report")
    asked.method.change(lambda method: shown_settings(asked, method), asked.method, list(asked.settings.values()),
                        api_name="video_settings")  # fmt: skip
    demo.load(lambda: for_model(session), None, [asked.method, asked.refused], api_name="video_methods")
