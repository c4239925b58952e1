"""The CUDA path: peak memory, CUDA-event timing, the max-batch search, flash-attn cells. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_search import search_max_batch
from benchmarks.step import Cell, measure_cuda

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_peak_memory_and_event_timing(kernel):
    out = measure_cuda(Cell("S", "dual", kernel, "off", 2), DEV, torch.bfloat16, warmup=1, steps=2)
    assert len(out["step_times_s"]) == 2 and all(t > 0 for t in out["step_times_s"])
    # the peak holds at least the saved activations plus the fp32 weights, grads and AdamW state
    assert out["peak_allocated_bytes"] > out["saved_activation_bytes"]
    assert out["kernel_used"] == kernel


def test_encoder_only_peaks_higher_with_math():
    enc, dual = (measure_cuda(Cell("B", m, "math", "off", 2), DEV, torch.bfloat16, 1, 1)
                 for m in ("encoder_only", "dual"))
    assert enc["peak_allocated_bytes"] > dual["peak_allocated_bytes"]


def test_max_batch_search_returns_a_fitting_batch():
    out = search_max_batch(Cell("debug", "dual", "sdpa", "off", 1), DEV, torch.bfloat16, limit=16)
    assert out["max_batch"] == 16 and out["clips_per_s_at_max_batch"] > 0


def test_flash_attn_cell():
    pytest.importorskip("flash_attn")
    out = measure_cuda(Cell("S", "dual", "flash_attn", "off", 2), DEV, torch.bfloat16, warmup=1, steps=1)
    assert out["kernel_used"] == "flash_attn"


def test_cli_on_cuda_with_deepspeed_row(tmp_path):
    """The GPU report path end to end: peak memory column, searched max batch, DeepSpeed ZeRO-3 on CUDA."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "benchmarks", "--preset", "smoke", "--device", "cuda", "--kernels", "sdpa",
           "--ckpt", "off", "--search-max-batch", "--ds", "debug:2", "--out", str(tmp_path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(r["peak_allocated_bytes"] > 0 and r["max_batch"] > 0 for r in data["measured"])
    assert data["deepspeed"]["zero_stage"] == 3 and data["deepspeed"]["peak_allocated_bytes"] > 0
    assert data["ratios"][0]["max_batch_source"] == "measured"
