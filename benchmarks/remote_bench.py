"""Loader throughput on the same shards from the local folder and over loopback HTTP, side by side.

The folder is served by `vmae-shards serve` (127.0.0.1, range requests) in a process of its own that is not
a child of this one, so its CPU time is not counted as the loader's; the same pretraining loader reads the
shards both ways, in alternating rounds (the median is shown), so load from other jobs hits both alike.
Over loopback the network costs nothing: what differs is the HTTP client, the per-shard requests and the
copies, i.e. the overhead our remote reads add on top of decoding.

    python -m benchmarks.remote_bench                    # synthetic 320p shards, made first
    python -m benchmarks.remote_bench --shards DIR --workers 8 --batches 50
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from benchmarks.loader_bench import measure, synth_shards
from vmae_ds.data import DataConfig, build_pretrain_loader, default_mask_fn, token_grid
from vmae_ds.engine.data_source import endless


def _round(shards: str, a: argparse.Namespace, **extra) -> dict:
    cfg = DataConfig(shards=shards, num_frames=a.num_frames, input_size=a.input_size, num_sample=a.num_sample,
                     num_workers=a.workers, pin_memory=False, resampled=True, **extra)
    loader = build_pretrain_loader(cfg, batch_size=a.batch_size, rank=0, world_size=1, seed=0,
                                   mask_fn=default_mask_fn(token_grid(cfg)))
    try:
        before = loader.stats()
        r = measure(endless(loader), a.batches, a.warmup, a.batch_size)
        st = loader.stats()
    finally:
        loader.close()
    r["read_mb"] = (st["bytes_read"] - before["bytes_read"]) / 1e6
    r["cache_mb"] = (st["cached_bytes"] - before["cached_bytes"]) / 1e6
    r["read_retries"] = st["read_retries"]
    return r


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """`vmae-shards serve FOLDER` on a free loopback port, detached from this process (sh starts it in the
    background and exits, so it is nobody's child here); its URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = f"{sys.executable} -m data_tools serve {folder} --port {port} >/dev/null 2>&1 & echo $!"
    pid = int(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/index.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        os.kill(pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.remote_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a shard folder with index.json (default: make synthetic 320p shards)")
    p.add_argument("--synth-clips", type=int, default=24, help="synthetic clips (default 24)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch after repetition (default 8)")
    p.add_argument("--num-sample", type=int, default=4, help="repeated augmentation (default 4)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--input-size", type=int, default=224, help="crop side (default 224)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per round (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is shown (default 3)")
    p.add_argument("--cache", action="store_true", help="also HTTP through a local cache_dir (a temporary one)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if a.shards is None:
            print(f"making {a.synth_clips} synthetic 320x426 clips of 96 frames ...", flush=True)
            folder = synth_shards(Path(tmp), a.synth_clips, (320, 426), 96, workers=max(1, a.workers))
        else:
            folder = Path(a.shards)
        with served(folder) as url:
            ways = {"local folder": (str(folder), {}), "HTTP (loopback)": (f"{url}/index.json", {})}
            if a.cache:
                ways["HTTP + cache_dir"] = (f"{url}/index.json", {"cache_dir": str(Path(tmp) / "cache")})
            rounds: dict[str, list[dict]] = {k: [] for k in ways}
            for _ in range(a.rounds):
                for name, (shards, extra) in ways.items():
                    rounds[name].append(_round(shards, a, **extra))
    results = {k: sorted(rs, key=lambda r: r["clips_per_s"])[len(rs) // 2] for k, rs in rounds.items()}
    base = results["local folder"]["clips_per_s"]
    print(f"\n{folder}: {a.num_frames} frames x {a.input_size}px, num_sample {a.num_sample}, batch {a.batch_size}, "
          f"{a.workers} workers, {a.batches} timed batches x {a.rounds} rounds (median), host CPUs "
          f"{psutil.cpu_count()}; clips = samples after repetition")
    print("| source            | clips/s | CPU cores used | MB read | MB/s read | MB from cache | vs local |")
    print("|-------------------|---------|----------------|---------|-----------|---------------|----------|")
    for name, r in results.items():
        print(f"| {name:<17} | {r['clips_per_s']:7.1f} | {r['cores_used']:14.2f} | {r['read_mb']:7.1f} | "
              f"{r['read_mb'] / r['wall_s']:9.1f} | {r['cache_mb']:13.1f} | {r['clips_per_s'] / base:7.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
