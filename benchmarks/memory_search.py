"""Largest micro-batch per cell: searched on a GPU (OOM = does not fit), estimated from bytes elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .step import Cell, build_model, make_batch, make_optimizer, timed_steps

ADAMW_BYTES_PER_PARAM = 16  # fp32 weight + grad + two AdamW moments


def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = 4096) -> int:
    """Largest b in [1, limit] with fits(b), assuming monotone fits: doubling, then bisection. 0 if none."""
    if not fits(start):
        return 0
    lo, hi = start, None
    while hi is None:
        nxt = lo * 2
        if nxt > limit:
            hi = limit + 1
            break
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def search_max_batch(cell: Cell, device: torch.device, amp: torch.dtype | None, warmup: int = 1,
                     steps: int = 3, limit: int = 1024) -> dict:
    """CUDA only: largest micro-batch whose full training step runs, and its throughput (clips/s)."""
    model = build_model(cell, device)
    opt = make_optimizer(model)

    def fits(b: int) -> bool:
        try:
            timed_steps(model, opt, make_batch(model, cell, b, device), amp, warmup=1, steps=0)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    best = largest_fitting(fits, limit=limit)
    out = {"max_batch": best, "max_batch_source": "measured"}
    if best:
        times = timed_steps(model, opt, make_batch(model, cell, best, device), amp, warmup, steps)
        times.sort()
        out["clips_per_s_at_max_batch"] = best / times[len(times) // 2]
    return out


def estimate_max_batch(num_params: int, saved_bytes_per_clip: float, budget_bytes: float) -> int:
    """Bytes-only estimate: (budget - AdamW state) / saved activations per clip. Ignores the transient
    workspace of the backward and allocator fragmentation, so it is an upper bound; marked computed."""
    free = budget_bytes - ADAMW_BYTES_PER_PARAM * num_params
    return max(0, int(free // saved_bytes_per_clip)) if saved_bytes_per_clip > 0 else 0
