"""The next batch, fetched and moved to the device while the current step computes.

A loader's `next()` is host work: the shard loader hands over a batch its workers decoded, the synthetic
source stacks clips and draws masks, and the objective's `to_device` turns masks into index tensors and
queues the copy. Run on the training thread between two kernels, that host work is time the device waits
(in the first H200 measurement it sat between backward and the optimizer step and was billed to the
optimizer). Here it runs on one background thread, one batch ahead: the fetch of batch k+1 starts when batch
k is handed over and has the whole step k to finish.

Exact resume: the loader position is read on the training thread right before each fetch is started, when
the fetch thread is idle (the previous fetch has been handed over), so `state_dict()` is the position of the
oldest batch not yet consumed, with no race; a checkpoint taken with a fetch in flight resumes at it.
Nothing in a fetch may draw from the global RNGs (the loaders use their own generators; `to_device` only
copies), so running it on another thread changes no result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch (nested dicts, lists, tuples, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from tensors_in(getattr(obj, name))


def pinned(obj: Any) -> Any:
    """Host tensors of a batch in page-locked memory, so the copy to the GPU is asynchronous (a DataLoader with
    pin_memory already hands them over pinned; device tensors are left as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory() if obj.device.type == "cpu" and not obj.is_pinned() else obj
    if isinstance(obj, dict):
        return {k: pinned(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [pinned(v) for v in obj]
    return obj


class BatchPrefetcher:
    """Batches on the device, one fetched ahead on a background thread.

    `next()` returns the batch fetched during the previous step and starts the fetch of the following one;
    `wait_s` accumulates the training thread's time spent waiting for a fetch that had not finished (the data
    wait). On CUDA the copy is queued on a side stream that the compute stream waits for at hand-over.
    `fetch_delay_s` (a test hook) makes every fetch sleep, as a slow loader would.
    """

    def __init__(self, source: Iterator[dict], to_device: Callable[[dict], dict], device: torch.device,
                 loader_state: Callable[[], dict], fetch_delay_s: float = 0.0):
        self.source, self.to_device, self.device = source, to_device, device
        self.loader_state, self.fetch_delay_s = loader_state, fetch_delay_s
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vmae-prefetch", initializer=self._thread_init)
        self._pending: tuple[Future, dict] | None = None  # (fetch, loader state before it)
        self.wait_s = 0.0
        self.last_keys: list | None = None  # the sample keys of the batch `next` returned last

    def _thread_init(self) -> None:
        if self.cuda:  # the current device is per thread; a new thread starts on device 0
            torch.cuda.set_device(self.device)

    def _fetch(self) -> tuple[dict, list | None, Any]:
        if self.fetch_delay_s:
            time.sleep(self.fetch_delay_s)
        raw = next(self.source)
        keys = raw.get("keys")
        if not self.cuda:
            return self.to_device(raw), keys, None
        raw = pinned(raw)
        with torch.cuda.stream(self.stream):
            batch = self.to_device(raw)
            done = torch.cuda.Event()
            done.record(self.stream)
        return batch, keys, done

    def start(self) -> None:
        """Start fetching the next batch now (no-op when one is already pending)."""
        if self._pending is None:
            state = self.loader_state()  # the fetch thread is idle here: nothing else touches the loader
            self._pending = (self._pool.submit(self._fetch), state)

    def next(self, fetch_following: bool = True) -> dict:
        """The next batch, ready on the device (for the compute stream); then, unless told otherwise (after
        SIGTERM no batch is drawn), the fetch of the one after it starts."""
        self.start()
        future, _ = self._pending
        t0 = time.perf_counter()
        batch, self.last_keys, done = future.result()  # a loader error is raised here, on the training thread
        self.wait_s += time.perf_counter() - t0
        self._pending = None
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in tensors_in(batch):  # memory made on the side stream is now used on the main one
                if t.device.type == "cuda":
                    t.record_stream(current)
        if fetch_following:
            self.start()
        return batch

    def state_dict(self) -> dict:
        """The loader position of the next batch the trainer will consume."""
        return self._pending[1] if self._pending is not None else self.loader_state()

    def close(self) -> None:
        """Let a fetch in flight finish (the loader is closed after this), then stop the thread."""
        if self._pending is not None:
            try:
                self._pending[0].result()
            except Exception:  # noqa: BLE001 - the run is ending; its own error (if any) is already reported
                pass
            self._pending = None
        self._pool.shutdown(wait=True)
