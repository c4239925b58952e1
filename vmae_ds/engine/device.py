"""Watching the device without stalling it: step timing from events, and a counter of the host syncs that remain
(the batch prefetch is in prefetch.py)."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch


class StepTimer:
    """Wall time per step, and optionally per phase, without a host sync: CUDA events (or perf_counter on the
    CPU) read back only when the metrics are written. `mark(name)` closes the phase that ran since the last
    mark; phases of the micro-steps of one optimizer step add up."""

    def __init__(self, device: torch.device, phases: bool = False):
        self.cuda = device.type == "cuda"
        self.phases = phases
        self._marks: list[tuple[str, Any]] = []
        self.done: list[list[tuple[str, Any]]] = []

    def _now(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        if self.phases:
            self._marks.append((name, self._now()))

    def stop(self) -> None:
        self._marks.append(("end", self._now()))
        self.done.append(self._marks)
        self._marks = []

    def drop_last(self) -> None:
        self.done.pop()

    def _seconds(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def collect(self) -> list[tuple[float, dict[str, float]]]:
        """(seconds, {phase: seconds}) of every stopped step since the last collect (waits for the device
        only here)."""
        out = []
        for marks in self.done:
            total = self._seconds(marks[0][1], marks[-1][1])
            split: dict[str, float] = {}
            for (_, a), (name, b) in zip(marks[:-1], marks[1:]):
                if name != "end":
                    split[name] = split.get(name, 0.0) + self._seconds(a, b)
            out.append((total, split))
        self.done = []
        return out


class SyncCounter:
    """Host-device synchronizations made by any code (ours, DeepSpeed's, torch's) between `start()` and `stop()`,
    by where in Python they were made. Implicit ones (`.item()`, a blocking copy, a data-dependent shape) come from
    torch.cuda.set_sync_debug_mode("warn"), which turns each into a warning; that mode does not see an explicit
    `torch.cuda.synchronize()` (DeepSpeed calls it), so those are counted by wrapping it for the while. CUDA only;
    elsewhere it counts nothing and `stop()` returns None."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self._catch: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []
        self._explicit: list[str] = []
        self._real_sync: Callable[..., Any] | None = None

    def start(self) -> None:
        if not self.enabled or self._catch is not None:
            return
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")  # every sync, not the first one per line
        real = self._real_sync = torch.cuda.synchronize

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._explicit.append(_caller())
            return real(*args, **kwargs)

        torch.cuda.synchronize = counted
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> Counter[str] | None:
        if self._catch is None:
            return None
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize = self._real_sync
        self._catch.__exit__(None, None, None)
        self._catch = None
        implicit = [f"{_short(r.filename)}:{r.lineno}" for r in self._records
                    if "synchroniz" in str(r.message).lower()]
        counted = Counter(implicit) + Counter(f"{where} (synchronize)" for where in self._explicit)
        self._explicit = []
        return counted


def _caller() -> str:
    """file:line of the code that asked for the synchronize, past the accelerator wrappers in between."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and ("accelerator" in frame.f_code.co_filename or
                                 _short(frame.f_code.co_filename).startswith("torch/")):
        frame = frame.f_back
    return "?" if frame is None else f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"


def _short(path: str) -> str:
    """.../site-packages/deepspeed/runtime/x.py -> deepspeed/runtime/x.py: from the package folder on."""
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("site-packages"):])
    for i, part in enumerate(parts):
        if part in ("deepspeed", "torch", "vmae_ds", "benchmarks", "tests"):
            return "/".join(parts[i:])
    return "/".join(parts[-2:])
