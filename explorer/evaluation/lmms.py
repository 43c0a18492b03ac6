"""The explorer as an lmms-eval model, `explorer`: any lmms-eval image or video task, answered by the pipeline
with a method at a budget.

    python -m lmms_eval --model explorer --tasks textvqa_val --output_path out \
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hired,budget=0.2,alpha=0.5

`model_args`: `pretrained` (a Hub id, a local folder or a tiny-* model), `method` (default `none`), `budget`
(a fraction) or `tokens` (a count), `device`, `random_weights`, `frames` (sampled from each video: default 8
on a CPU, 16 on a GPU), `records` (a file that gets every sample's numbers as JSON lines) and any setting of
the method as `key=value`. lmms-eval finds the model through the entry point group `lmms_eval.models`
(pyproject.toml), so the project must be installed (`pip install -e .`).

Each question goes through `explorer.engine.pipeline.stream` with the task's own prompt (`doc_to_text`, as the
text of one user turn after the image, in the model's chat template, as lmms-eval's llava_hf does) and its
generation arguments: greedy, `max_new_tokens`, and the answer cut at the first `until` string (the generation
stops there). A video task's `doc_to_visual` gives the path of its video file, as lmms-eval's video tasks
(VideoMME, MVBench, EgoSchema) do and as its own video models read it: `frames` frames are sampled from it
evenly (`engine.video.load_video`, transformers' sampler; lmms-eval's models take `linspace(0, total - 1, n)`,
first and last frame included) and the clip runs through the pipeline as a clip. `loglikelihood`
(multiple-choice tasks) scores each choice by teacher forcing on the reduced model (`fidelity.logprobs`): the
mean negative log-probability of its tokens, as lmms-eval's models return it. For every sample it keeps the
pipeline's own numbers (`records`): visual tokens, full and kept, visual tokens per LLM layer, time to first
token, prefill FLOPs and KV bytes; a multiple-choice question gets them from one more run of its prompt, one
token long.

Under `accelerate launch --num_processes N` each process loads its own model on its own device; lmms-eval
splits the questions between them and gathers the answers. Questions are answered one at a time.
"""

from __future__ import annotations

import json
import typing

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

import backends

from ..core import Budget, ExplorerError
from ..engine import fidelity
from ..engine.pipeline import Result, method_for, run, stream
from ..engine.video import Clip, load_video
from ..methods import METHODS

FULL = Budget(fraction=1.0)
DEFAULT_MAX_NEW_TOKENS = 1024  # what lmms-eval's own models generate when a task does not say


def manifests():
    """The entry point lmms-eval reads (`lmms_eval.models` group): the model `explorer`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="explorer", simple_class_path="explorer.evaluation.lmms.ExplorerModel")]


class ExplorerModel(lmms):
    """One loaded model answering with one method at one budget; `configure` switches method and budget
    without loading again (`python -m explorer eval` runs a whole grid on one load)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        budget: float | None = None,
        tokens: int | None = None,
        device: str | None = None,
        random_weights: bool = False,
        records: str = "",
        frames: int | None = None,
        batch_size=1,  # lmms-eval always passes these two; questions are answered one at a time
        max_batch_size=None,
        **settings,
    ):
        super().__init__()
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # one model per process, on that process's device
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device)
            if str(pretrained) in backends.RANDOM:
                raise ExplorerError(
                    f"{pretrained} is built in a temporary folder, which transformers lets only the first of several "
                    "processes write: save it once (backends.load(...).model and .processor, save_pretrained) and "
                    "pass that folder"
                )
        self.backend = backends.load(str(pretrained), device, bool(random_weights))
        self.frames = None if frames is None else int(frames)  # sampled from each video; None: the device's default
        self.records_file = str(records or "")
        self.records: list[dict] = []  # every sample's numbers since the last `configure`
        self.configure(method, budget_of(budget, tokens), typed(method, settings))

    def configure(self, method: str, budget: Budget | None = None, settings: dict | None = None, label: str = ""):
        """Answer with `method` at `budget` (None: everything) from now on; the records start anew."""
        budget = budget or FULL
        method_for(self.backend, method, settings, budget)  # refuses unknown methods and settings, with the reason
        self.method, self.budget, self.settings = method, budget, dict(settings or {})
        self.label = label or f"{method} {budget}"
        self.records = []

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def clean(self) -> None:
        """lmms-eval calls this after every evaluation to free the model (its own deletes every nn.Module
        attribute); here the model stays loaded for the next one, and nothing is collected (a gc pass of a
        process this size took over a second)."""

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        answers = []
        for request in self._progress(requests):
            context, options, doc_to_visual, doc_id, task, split = request.args
            image = self._media(doc_to_visual, task, split, doc_id)
            length, until = generation(options)
            result = None
            for result in stream(self.backend, image, context, self.method, self.budget, self.settings, length):
                if cut(result.answer, until) != result.answer:
                    break  # the answer reached a stop string: generating on would not change it
            self._record(request, result)
            counts = TokenCounts(input_tokens=_entering(result), output_tokens=result.tokens["generated"])
            answers.append(GenerationResult(text=cut(result.answer, until), token_counts=counts))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(loss, greedy) per request: the mean negative log-probability of the continuation's tokens under
        the reduced model, and whether each of them is its greedy choice. Wrapped in GenerationResult,
        which lmms-eval 0.7.3 passes through unchanged (a bare tuple would reach scoring as a string)."""
        scored, seen = [], set()
        for request in self._progress(requests):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))
            image = self._media(doc_to_visual, task, split, doc_id)
            ids = self.continuation_ids(context, continuation)
            logprobs = fidelity.logprobs(self.backend, image, context, ids, self.method, self.budget, self.settings)
            wanted = torch.tensor(ids)[:, None]  # (T, 1)
            loss = -logprobs.gather(1, wanted).mean().item()
            greedy = bool((logprobs.argmax(-1) == wanted[:, 0]).all())
            if (task, doc_id) not in seen and not _padding(request):  # the question's numbers, once
                seen.add((task, doc_id))
                self._record(request, run(self.backend, image, context, self.method, self.budget, max_new_tokens=1))
            scored.append(GenerationResult(text=(loss, greedy)))
        return scored

    def generate_until_multi_round(self, requests) -> list[str]:
        raise ExplorerError("the explorer model answers one question per image; multi-round tasks are not supported")

    def continuation_ids(self, context: str, continuation: str) -> list[int]:
        """The continuation's token ids as they follow the prompt in the chat template (tokenized together
        with it, so that a leading space is read as the tokenizer reads it there)."""
        tokenizer, prompt = self.backend.tokenizer, self.backend.chat(context)
        start = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        ids = whole[len(start) :] if whole[: len(start)] == start else []
        ids = ids or tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ExplorerError(f"the continuation {continuation!r} has no tokens to score")
        return ids

    def _media(self, doc_to_visual, task: str, split: str, doc_id: int) -> Image.Image | Clip:
        """The question's image, or the frames sampled from its video (a task gives a video as its file's path)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image | str):
            raise ExplorerError(
                f"{task}, question {doc_id}: it comes with {len(visuals)} images or videos; the explorer answers "
                "about one image or one video a question"
            )
        if isinstance(visuals[0], str):
            return load_video(visuals[0], frames=self.frames, device=str(self.device))
        return visuals[0]

    def _progress(self, requests: list[Instance]):
        return tqdm(requests, desc=self.label, unit="sample", disable=self.rank != 0)

    def _record(self, request: Instance, result: Result) -> None:
        """Keep the sample's numbers, as the pipeline measured them (not for lmms-eval's padding requests)."""
        if _padding(request):
            return
        _, _, _, doc_id, task, _ = request.args
        record = {"task": task, "doc_id": doc_id, **numbers(result)}
        self.records.append(record)
        if self.records_file:
            path = self.records_file + (f".rank{self.rank}" if self.world_size > 1 else "")
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")


def numbers(result: Result) -> dict:
    """A sample's numbers from the pipeline's `Result`."""
    tokens = result.tokens
    return {
        "visual_full": tokens["visual_full"],
        "visual_kept": tokens["visual_kept"],
        "visual_layer_mean": tokens["visual_layer_mean"],
        "ttft_s": result.timing["ttft_s"],
        "prefill_flops": result.cost["prefill_flops"],
        "kv_bytes": result.cost["kv_bytes"],
        "vision_flops": result.cost["vision_flops"],
        "generated": tokens["generated"],
    }


def generation(options: dict) -> tuple[int, list[str]]:
    """max_new_tokens and the stop strings of a task's generation arguments; sampling and beams are refused."""
    if float(options.get("temperature") or 0) > 0 or int(options.get("num_beams") or 1) > 1:
        raise ExplorerError(
            f"the task asks for sampling or beam search ({options}); the explorer decodes greedily, as the papers "
            "evaluate: set temperature=0 and num_beams=1 in its generation arguments"
        )
    until = options.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return int(options.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), [stop for stop in until if stop]


def cut(answer: str, until: list[str]) -> str:
    """The answer up to the first of the stop strings."""
    for stop in until:
        answer = answer.split(stop)[0]
    return answer


def budget_of(budget: float | None, tokens: int | None) -> Budget | None:
    """The budget of `model_args`: a fraction, or a number of tokens; None when neither is given."""
    if budget is not None and tokens is not None:
        raise ExplorerError("give the budget as budget= (a fraction) or as tokens= (a count), not both")
    if tokens is not None:
        return Budget(tokens=int(tokens))
    return Budget(fraction=float(budget)) if budget is not None else None


def typed(method: str, settings: dict) -> dict:
    """Method settings as lmms-eval parsed them (numbers and booleans), with text settings made text again."""
    types = typing.get_type_hints(METHODS[method]) if method in METHODS else {}
    return {key: str(value) if types.get(key) is str else value for key, value in settings.items()}


def _entering(result: Result) -> int:
    """The tokens the LLM received: the prompt's text and the visual tokens that entered it."""
    tokens = result.tokens
    return tokens["text"] + tokens.get("visual_entering", tokens["visual_kept"])


def _padding(request: Instance) -> bool:
    """lmms-eval's copies of a request that even out the processes' shares; they are not scored."""
    return bool(request.metadata.get("__padding_only__"))
