"""Run `process_clip` over many processes, results in task order, surviving a worker that crashes.

A decoder can segfault on a damaged file. A plain multiprocessing.Pool then waits forever for the lost
task; here the pool breaks visibly, the clips in flight are retried one per fresh process, and the one
that kills its process is reported as a skipped clip with that reason.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_tools.clipcheck import ClipResult, process_clip, sample_key

CRASH_REASON = "decoder crashed its process (damaged file, or out of memory)"


def quiet_decoders() -> None:
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # reasons go to errors.jsonl, not to the terminal


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent alone
    try:  # Linux: die with the parent, so a killed build leaves no orphan workers behind
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    quiet_decoders()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # decord's C++ log lines; every reason still reaches errors.jsonl


def _executor(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_init)


def _isolated(task: tuple) -> ClipResult:
    """Run one task alone in a fresh process; a crash there is that clip's fault."""
    with _executor(1) as ex:
        try:
            return ex.submit(process_clip, task).result()
        except BrokenProcessPool:
            return ClipResult(task[0], sample_key(task[0], task[1]["path"]), False, reason=CRASH_REASON)


def run_ordered(tasks: Iterable[tuple], workers: int) -> Iterator[ClipResult]:
    """process_clip(task) for every task, in order. workers <= 0 runs in this process (debugging)."""
    if workers <= 0:
        quiet_decoders()
        yield from map(process_clip, tasks)
        return
    window = workers * 8  # bounded read-ahead: memory stays flat on a million-clip manifest
    todo = iter(tasks)
    inflight: deque[tuple[tuple, Future]] = deque()
    ex = _executor(workers)
    try:
        while True:
            while len(inflight) < window and (task := next(todo, None)) is not None:
                inflight.append((task, ex.submit(process_clip, task)))
            if not inflight:
                return
            task, fut = inflight[0]
            try:
                result = fut.result()
            except BrokenProcessPool:
                ex.shutdown(wait=True, cancel_futures=True)
                redo = list(inflight)
                inflight.clear()
                for t, f in redo:
                    done = f.done() and not f.cancelled() and f.exception() is None
                    yield f.result() if done else _isolated(t)
                ex = _executor(workers)
                continue
            inflight.popleft()
            yield result
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
