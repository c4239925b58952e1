"""Feeding the device without stalling it: batch prefetch on a side stream, step timing from events."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


class Prefetcher:
    """Batches already moved to the device, one fetched ahead.

    On CUDA the copy of the next batch runs on a side stream while the current one computes (the trainer
    calls `preload()` once the current micro-step's kernels are queued); on the CPU the move is immediate.
    `wait_s` accumulates the host time spent waiting for the loader. The loader's position is snapshotted
    before each fetch, so a checkpoint taken with a batch pending stores the position *before* it.
    """

    def __init__(self, source: Iterator[dict], to_device: Callable[[dict], dict], device: torch.device,
                 loader_state: Callable[[], dict]):
        self.source, self.to_device, self.device = source, to_device, device
        self.loader_state = loader_state
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: tuple[dict, dict] | None = None  # (batch on device, loader state before it)
        self.wait_s = 0.0

    def preload(self) -> None:
        if self._pending is not None:
            return
        state = self.loader_state()
        t0 = time.perf_counter()
        raw = next(self.source)
        self.wait_s += time.perf_counter() - t0
        if self.stream is None:
            self._pending = (self.to_device(raw), state)
            return
        with torch.cuda.stream(self.stream):
            self._pending = (self.to_device(raw), state)

    def next(self) -> dict:
        self.preload()
        batch, _ = self._pending
        self._pending = None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in _tensors(batch):  # memory made on the side stream is now used on the main one
                t.record_stream(current)
        return batch

    def state_dict(self) -> dict:
        """The loader position of the next batch the trainer will consume."""
        return self._pending[1] if self._pending is not None else self.loader_state()


class StepTimer:
    """Wall time per step without a host sync: CUDA events read back only when the metrics are written."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: Any = None
        self.done: list[Any] = []

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.done.append((self._open, end))
        else:
            self.done.append(time.perf_counter() - self._open)
        self._open = None

    def drop_last(self) -> None:
        self.done.pop()

    def collect(self) -> list[float]:
        """Seconds of every stopped step since the last collect (waits for the device only here)."""
        out = []
        for item in self.done:
            if self.cuda:
                item[1].synchronize()
                out.append(item[0].elapsed_time(item[1]) / 1e3)
            else:
                out.append(item)
        self.done = []
        return out
