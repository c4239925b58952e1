"""Shard reads in the training log: bytes read, read throughput and retries per rank, unreachable shards.

Next to the data-wait share of the progress line, these say whether storage is what a run waits for: a
rank whose read MB/s stays flat while data wait climbs is storage-bound.
"""

from __future__ import annotations

import time

MB = 1e6


def read_totals(stats: dict) -> dict:
    """This rank's shard-read counters, from the loader's stats() (what every rank contributes)."""
    return {"bytes": int(stats.get("bytes_read", 0)), "cached": int(stats.get("cached_bytes", 0)),
            "wait_s": float(stats.get("read_s", 0.0)), "retries": int(stats.get("read_retries", 0)),
            "unreachable": dict(stats.get("unreachable_shards", {})), "missing": int(stats.get("missing_samples", 0))}


class StorageMeter:
    """Every rank's totals -> the metrics fields; throughput over the time since the previous record (none
    for the first record of a process: totals carried over from before a resume are no rate)."""

    def __init__(self) -> None:
        self._last: tuple[float, list[int]] | None = None

    def fields(self, per_rank: list[dict]) -> dict:
        now = time.monotonic()
        done = [r["bytes"] for r in per_rank]
        rates = None
        if self._last is not None and now > self._last[0] and len(self._last[1]) == len(done):
            rates = [round((b - a) / MB / (now - self._last[0]), 3) for a, b in zip(self._last[1], done, strict=True)]
        self._last = (now, done)
        unreachable: dict[str, int] = {}
        for r in per_rank:
            for name, n in r["unreachable"].items():
                unreachable[name] = unreachable.get(name, 0) + n
        return {"data_read_mb": [round(b / MB, 3) for b in done], "data_read_mb_s": rates,
                "data_cache_mb": [round(r["cached"] / MB, 3) for r in per_rank],
                "data_read_wait_s": [round(r["wait_s"], 3) for r in per_rank],
                "data_read_retries": [r["retries"] for r in per_rank],
                "data_unreachable": dict(sorted(unreachable.items())),
                "data_missing": sum(r["missing"] for r in per_rank)}


def _mb(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def storage_line(rec: dict) -> str:
    """The progress line's part: ' | read 41.2 MB/s a rank (slowest rank 3: 12.0), 2 retries | unreachable ...'."""
    if "data_read_mb" not in rec:
        return ""
    rates, mb = rec.get("data_read_mb_s"), rec["data_read_mb"]
    if rates:
        slow = min(range(len(rates)), key=rates.__getitem__)
        out = f" | read {_mb(sum(rates) / len(rates))} MB/s a rank"
        if len(rates) > 1:
            out += f" (slowest rank {slow}: {_mb(rates[slow])})"
    else:
        out = f" | read {_mb(sum(mb) / len(mb))} MB a rank"
    cached = sum(rec.get("data_cache_mb") or [])
    if cached:
        out += f", {cached:.0f} MB from cache"
    retries = sum(rec.get("data_read_retries") or [])
    if retries:
        out += f", {retries} retries"
    gone = rec.get("data_unreachable") or {}
    if gone:
        names = sorted(gone)
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
        missing = rec.get("data_missing", 0)
        out += f" | unreachable shards {len(names)}: {shown} ({missing} sample{'s' * (missing != 1)} missing)"
    return out
