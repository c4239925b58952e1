"""`python -m benchmarks` end to end in a fresh process, with the real DeepSpeed ZeRO-3 bf16 row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_the_tool():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "encoder-only" in out.stdout and "--preset" in out.stdout and "make bench" in out.stdout


def test_smoke_run_with_deepspeed_row(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "smoke", "--kernels", "sdpa", "--ckpt", "off",
           "--ds", "debug:2", "--out", str(tmp_path), "--quiet", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DeepSpeed engine:" in out.stdout and "| debug | 2 | dual |" in out.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    ds = data["deepspeed"]
    assert ds["zero_stage"] == 3 and ds["precision"].startswith("bf16")
    assert ds["world_size"] == 1 and ds["step_time_s"] > 0 and ds["tflops"] > 0


def test_loader_bench_help_and_missing_shards(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.loader_bench"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m benchmarks.loader_bench")
    assert "frames per clip (default 16)" in out.stdout and "crop side in pixels (default 224)" in out.stdout
    out = subprocess.run([*cmd, "--shards", str(tmp_path / "nope"), "--batches", "1"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--shards: 1 of 1 shard(s) not found" in out.stderr and "nope" in out.stderr
