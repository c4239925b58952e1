"""`make gpu-check` on a machine without CUDA says so in one line and exits 2; the pieces it runs that can run on a
CPU (the authors' step) are checked here; the GPU-only checks live under the `gpu` mark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for cmd in (["bash", "scripts/gpu_check.sh"], [sys.executable, "-m", "benchmarks.gpu_check"]):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr.strip() == ("gpu-check: no CUDA device here (torch.cuda.is_available() is False): run it "
                                    "on a GPU machine"), r.stderr
        assert r.stdout == ""


def test_authors_step_runs_and_reports(tmp_path):
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.authors_step", "--model", "debug", "--batch", "2",
                        "--num-sample", "2", "--steps", "1", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["samples_per_step"] == 4 and res["clips_per_s"] > 0 and "math attention" in res["config"]


def test_gpu_check_table_reads_every_stage():
    from benchmarks.gpu_check import table

    results = {"tests": {"ok": True, "summary": "9 passed"}, "bench": {"ok": True, "report": "r.json"},
               "engine": {"zero2": {"ok": True, "clips_per_s": 300.0, "mfu": 0.41, "peak_gib": 70.0,
                                    "reserved_gib": 75.0, "split": {"forward": 0.3, "backward": 0.6}},
                          "zero3": {"ok": False}},
               "authors": {"ok": True, "clips_per_s": 100.0, "peak_gib": 60.0},
               "umt": {"ok": True, "clips_per_s": 500.0, "mfu": 0.3, "mfu_with_teacher": 0.5, "peak_gib": 20.0},
               "loader": {"ok": True, "clips_per_s": 800.0, "data_wait": 0.02, "workers": 14}}
    text = table(results)
    assert "| ViT-g engine zero2 bf16 | ok | 300.0 | 41.0% | 70.0 / 75.0 | forward 30% backward 60% |" in text
    assert "| ViT-g engine zero3 bf16 | FAIL |" in text and "| speedup vs authors | 3.00x |" in text
    assert "MFU with teacher 50.0%" in text and "14 workers, data wait 2%" in text
