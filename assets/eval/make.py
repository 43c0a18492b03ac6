"""Draws the example evaluation set: small pictures whose answers are certain (a colour, a count, a word
drawn on the image), and its data.jsonl, the format `python -m explorer eval --dataset FOLDER` reads.

    python assets/eval/make.py     # rewrites assets/eval/images/*.png and assets/eval/data.jsonl

Everything is drawn with Pillow from fixed numbers, so the same Pillow draws the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent
SIZE = 224
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}


def square(colour: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(image).rectangle((52, 52, 172, 172), fill=COLOURS[colour])
    return image


def circles(count: int) -> Image.Image:
    """`count` black circles side by side, evenly spaced."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    step = SIZE // (count + 1)
    for i in range(1, count + 1):
        x = i * step
        draw.ellipse((x - 18, 94, x + 18, 130), fill="black")
    return image


def word(text: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=56)
    draw.text((SIZE / 2, SIZE / 2), text, fill="black", font=font, anchor="mm")
    return image


COLOUR_QUESTION = "What colour is the square? Answer with one word."
COUNT_QUESTION = "How many circles are there? Answer with a number."
WORD_QUESTION = "What word is written in the image? Answer with the word."
SET = [  # id, picture, question, answers
    ("red-square", square("red"), COLOUR_QUESTION, ["red"]),
    ("green-square", square("green"), COLOUR_QUESTION, ["green"]),
    ("blue-square", square("blue"), COLOUR_QUESTION, ["blue"]),
    ("yellow-square", square("yellow"), COLOUR_QUESTION, ["yellow"]),
    ("two-circles", circles(2), COUNT_QUESTION, ["2", "two"]),
    ("three-circles", circles(3), COUNT_QUESTION, ["3", "three"]),
    ("word-cat", word("CAT"), WORD_QUESTION, ["cat"]),
    ("word-sun", word("SUN"), WORD_QUESTION, ["sun"]),
]


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    lines = []
    for name, picture, question, answers in SET:
        picture.save(HERE / "images" / f"{name}.png", optimize=True)
        entry = {"id": name, "image": f"images/{name}.png", "question": question, "answers": answers}
        lines.append(json.dumps(entry))
    (HERE / "data.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
