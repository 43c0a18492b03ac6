"""Measurements: peak memory, a streamer that timestamps generated tokens, prefill time."""

from __future__ import annotations

import queue
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

now = time.perf_counter


def sync(device: torch.device) -> None:
    """Wait for the device, so a timestamp taken next means the work before it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory from `reset()` on: allocated CUDA memory on a GPU, resident set size on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets the process's peak resident size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # elsewhere the peak counts from process start

    def peak(self) -> int:
        """Bytes."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Cancelled(Exception):
    """Raised inside generate() to stop it once nobody is waiting for its tokens."""


class TokenStream:
    """A generate() streamer: timestamps each new token and hands it on through `events`."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()  # ("token", id, t), then ("end", None, t) or ("error", exc, t)
        self.stop = threading.Event()
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:  # generate() passes the prompt first, then each token
        if self.stop.is_set():
            raise Cancelled
        if self._prompt:
            self._prompt = False
            return
        self.events.put(("token", int(value.reshape(-1)[0]), now()))

    def end(self) -> None:
        self.events.put(("end", None, now()))


@contextmanager
def first_forward(model: torch.nn.Module, device: torch.device):
    """Yields a list that gets the start and end times of the model's next forward call (the prefill)."""
    marks: list[float] = []

    def before(module, args, kwargs):
        if not marks:
            sync(device)
            marks.append(now())

    def after(module, args, kwargs, output):
        if len(marks) == 1:
            sync(device)
            marks.append(now())

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield marks
    finally:
        for handle in handles:
            handle.remove()
