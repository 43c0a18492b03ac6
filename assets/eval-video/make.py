"""Draws the example video evaluation set: short clips whose answers are certain (which way a square moves,
its colour, how many times the picture flashes), and its data.jsonl, the format `python -m explorer eval
--dataset FOLDER` reads.

    python assets/eval-video/make.py     # rewrites assets/eval-video/videos/*.mp4 and assets/eval-video/data.jsonl

Every frame is drawn with numpy from fixed numbers and encoded with PyAV's MPEG-4 Part 2 encoder (FFmpeg's
`mpeg4`, in every PyAV wheel) at a fixed quality; a clip is 24 frames at 8 fps (3 s), 128x96, so that any
8 or more frames sampled evenly see the motion and every flash (each flash lasts 4 frames).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).parent
WIDTH, HEIGHT, RATE, COUNT = 128, 96, 8, 24
SIDE = 32  # the square's side in pixels
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}


def moving(colour: str, direction: str) -> list[np.ndarray]:
    """A square of `colour` crossing a white picture from one side to the other: (HEIGHT, WIDTH, 3) per frame."""
    frames = []
    for i in range(COUNT):
        x = round(i * (WIDTH - SIDE) / (COUNT - 1))
        x = x if direction == "right" else WIDTH - SIDE - x
        frame = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
        frame[(HEIGHT - SIDE) // 2 : (HEIGHT + SIDE) // 2, x : x + SIDE] = COLOURS[colour]
        frames.append(frame)
    return frames


def flashes(count: int) -> list[np.ndarray]:
    """A grey picture that turns white `count` times, 4 frames each, with 4 grey frames between flashes."""
    starts = [4 + 8 * k for k in range(count)]
    lit = {i for start in starts for i in range(start, start + 4)}
    return [np.full((HEIGHT, WIDTH, 3), 255 if i in lit else 60, dtype=np.uint8) for i in range(COUNT)]


def encode(frames: list[np.ndarray], path: Path) -> None:
    bitexact = {"fflags": "+bitexact"}  # no library version strings in the file: the same bytes every time
    with av.open(str(path), "w", options=bitexact) as container:
        stream = container.add_stream("mpeg4", rate=RATE, options={"qscale": "2", "flags": "+bitexact"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


DIRECTION = "Which way does the square move, left or right? Answer with one word."
COLOUR = "What colour is the moving square? Answer with one word."
FLASHES = "How many times does the picture flash white? Answer with a number."
SET = [  # id, frames, question, answers
    ("red-moves-right", moving("red", "right"), DIRECTION, ["right"]),
    ("blue-moves-left", moving("blue", "left"), DIRECTION, ["left"]),
    ("green-moves-right", moving("green", "right"), COLOUR, ["green"]),
    ("yellow-moves-left", moving("yellow", "left"), COLOUR, ["yellow"]),
    ("two-flashes", flashes(2), FLASHES, ["2", "two"]),
    ("three-flashes", flashes(3), FLASHES, ["3", "three"]),
]


def main() -> None:
    (HERE / "videos").mkdir(exist_ok=True)
    lines = []
    for name, frames, question, answers in SET:
        encode(frames, HERE / "videos" / f"{name}.mp4")
        entry = {"id": name, "video": f"videos/{name}.mp4", "question": question, "answers": answers}
        lines.append(json.dumps(entry))
    (HERE / "data.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
