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
