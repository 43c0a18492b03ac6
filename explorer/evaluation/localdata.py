"""A folder of one's own images or videos as an lmms-eval task: `python -m explorer eval --dataset FOLDER`.

FOLDER/data.jsonl holds one question a line, about an image or a video:

    {"id": "red-square", "image": "images/red-square.png", "question": "What colour is the square?", "answers": ["red"]}
    {"id": "moves-right", "video": "videos/moves-right.mp4", "question": "Which way?", "answers": ["right"]}

(`"answer": "red"` works too). A video reaches the model as its file's path, as lmms-eval's video tasks give
it; the model samples its frames (`lmms.ExplorerModel`'s `frames`). The prompt is the question, verbatim;
the metric is `exact_match`: the answer and each reference are case-folded, stripped of punctuation and of
the articles a, an, the, and their whitespace collapsed; the answer is right when it equals any reference.
The whole file is checked before anything runs: a bad line, a missing image or video or an empty file is one
`ExplorerError` (a video's frames are decoded when its question is asked).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from pathlib import Path

import datasets
from lmms_eval.api.task import ConfigurableTask

from ..core import ExplorerError
from ..engine.images import load_image

SPLIT = "test"
GENERATION = {"until": ["\n\n"], "max_new_tokens": 16, "do_sample": False, "temperature": 0.0}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation, " "))


def normalize(text: str) -> str:
    """Case-folded, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", str(text).casefold().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the prediction equals any of the answers once both are normalized, else 0.0."""
    said = normalize(prediction)
    return float(any(said == normalize(answer) for answer in answers))


def read(folder: str | Path) -> list[dict]:
    """The questions of FOLDER/data.jsonl, each {id, image or video, question, answers}, checked."""
    folder = Path(folder)
    path = folder / "data.jsonl"
    if not path.is_file():
        raise ExplorerError(f"{folder} has no data.jsonl (one JSON object a line: id, image, question, answers)")
    docs, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        doc = _entry(line, f"{path}, line {number}", folder)
        if doc["id"] in seen:
            raise ExplorerError(f"{path}, line {number}: the id {doc['id']!r} is used twice")
        seen.add(doc["id"])
        docs.append(doc)
    if not docs:
        raise ExplorerError(f"{path} holds no questions")
    return docs


def _entry(line: str, where: str, folder: Path) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ExplorerError(f"{where} is not JSON: {error.msg}") from None
    if not isinstance(entry, dict):
        raise ExplorerError(f"{where} is not a JSON object")
    answers = entry.get("answers", [entry["answer"]] if "answer" in entry else None)
    answers = [answers] if isinstance(answers, str) else answers
    if ("image" in entry) == ("video" in entry):
        raise ExplorerError(f"{where}: give an 'image' or a 'video' (a path in the folder), one of the two")
    media = "video" if "video" in entry else "image"
    for key, value, good in [
        ("id", entry.get("id"), isinstance(entry.get("id"), str | int) and str(entry.get("id")).strip()),
        (media, entry[media], isinstance(entry[media], str) and entry[media].strip()),
        ("question", entry.get("question"), isinstance(entry.get("question"), str) and entry["question"].strip()),
        ("answers", answers, isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)),
    ]:
        if not good:
            kind = "a non-empty list of strings (or an 'answer' string)" if key == "answers" else "a non-empty string"
            raise ExplorerError(f"{where}: {key!r} must be {kind}, got {value!r}")
    if not (folder / entry[media]).is_file():
        raise ExplorerError(f"{where}: the {media} {entry[media]} is not in {folder}")
    return {"id": str(entry["id"]), media: entry[media], "question": entry["question"], "answers": answers}


def name_of(folder: str | Path) -> str:
    """The task's name: local_ and the folder's name, in lower case letters, digits and underscores."""
    return "local_" + re.sub(r"[^a-z0-9]+", "_", Path(folder).resolve().name.lower()).strip("_")


def fingerprint(folder: str | Path) -> str:
    """A digest of the folder's data.jsonl, so that results of an edited set are not reused."""
    return hashlib.sha256((Path(folder) / "data.jsonl").read_bytes()).hexdigest()[:16]


def _visual(folder: Path, doc: dict) -> list:
    """The question's image, or its video's path (the model samples the frames, as for lmms-eval's video tasks)."""
    if doc["video"] is not None:
        return [str(folder / doc["video"])]
    return [load_image(str(folder / doc["image"]))]


def _score(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(results[0], doc["answers"])}


class LocalTask(ConfigurableTask):
    """The folder's questions as an lmms-eval task, held in memory (nothing goes to the datasets cache)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self.docs = read(self.folder)
        config = {
            "task": name_of(self.folder),
            "dataset_path": str(self.folder),
            "test_split": SPLIT,
            "output_type": "generate_until",
            "doc_to_visual": functools.partial(_visual, self.folder),
            "doc_to_text": "question",  # the column: the question, verbatim
            "doc_to_target": "answers",
            "process_results": _score,
            "generation_kwargs": dict(GENERATION),
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1},
        }
        super().__init__(config=config)

    def download(self, dataset_kwargs=None) -> None:
        docs = [{"image": None, "video": None} | doc for doc in self.docs]  # every row has both columns
        self.dataset = datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset  # the image or video is a path, kept in the logged samples
