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
