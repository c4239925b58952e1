"""The saved-activation counter against hand-computed bytes, and fake (full-size) counts against real ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.computed import analytic_flops, counted_flops, fake_step
from benchmarks.step import Cell, build_model, count_saved, make_batch
from vmae_ds.memory.saved_tensors import SavedTensorCounter

F32, BF16 = 4, 2


def test_linear_gelu_hand_computed():
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)  # so the input grad needs the weight
    with SavedTensorCounter(lin.parameters()) as c:
        F.gelu(lin(x))
    # addmm keeps x (4x8) for the weight grad and the weight for the input grad; GELU keeps its input (4x16)
    assert c.activation_bytes == (4 * 8 + 4 * 16) * F32
    assert c.param_bytes == 16 * 8 * F32
    assert c.weight_cast_bytes == 0


def test_views_share_one_storage():
    t = torch.randn(6, 10, requires_grad=True)
    with SavedTensorCounter() as c:
        y = t.exp()  # keeps its result y
        _ = y[0] * y[1:3].sum(0)  # keeps y[0] and a new sum tensor; y[0] is a view of y
    assert c.num_saved == 3
    assert c.activation_bytes == (6 * 10 + 10) * F32


def test_autocast_weight_casts_reported_apart():
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter(lin.parameters()) as c, torch.autocast("cpu", dtype=torch.bfloat16):
        F.gelu(lin(x))
    assert c.weight_cast_bytes == 16 * 8 * BF16  # the bf16 copy of the weight
    assert c.activation_bytes == (4 * 8 + 4 * 16) * BF16  # bf16 copy of x, GELU input
    assert c.param_bytes == 0  # the fp32 weight itself is never saved under autocast


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_attention_math_keeps_the_probabilities(kernel):
    b, h, n, d = 1, 2, 64, 4
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    with SavedTensorCounter() as c:
        if kernel == "math":
            (((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v).sum()
        else:
            F.scaled_dot_product_attention(q, k, v).sum()
    qkv = b * h * n * d * F32
    if kernel == "math":  # scaled q, k, the n x n probabilities, v
        assert c.activation_bytes == 3 * qkv + b * h * n * n * F32
    else:  # q, k, v, the output and one fp32 logsumexp per row: nothing quadratic in n
        assert c.activation_bytes == 4 * qkv + b * h * n * F32


def test_checkpoint_counts_block_inputs_only():
    blocks = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter(blocks.parameters()) as c:
        c.checkpoint_fn(blocks, x).sum()
    assert c.activation_bytes == 4 * 8 * F32
    assert c.param_bytes == 0


@pytest.mark.parametrize("cell", [Cell("debug", "dual", "math", "off", 2),
                                  Cell("debug", "encoder_only", "sdpa", "on", 2),
                                  Cell("debug", "encoder_only", "math", "off", 3)])
def test_fake_count_equals_real_count(cell):
    """The full-size numbers for ViT-g come from fake tensors: they must equal a real run byte for byte."""
    model = build_model(cell, "cpu")
    real = count_saved(model, make_batch(model, cell, cell.batch, "cpu"), torch.bfloat16)
    fake = fake_step(cell, torch.bfloat16)
    assert real.activation_bytes > 0
    assert (real.activation_bytes, real.weight_cast_bytes, real.param_bytes, real.max_block_bytes) == (
        fake["saved_activation_bytes"], fake["weight_cast_bytes"], fake["saved_param_bytes"], fake["max_block_bytes"])


def test_counted_forward_flops_match_analytic():
    for masking in ("encoder_only", "dual"):
        cell = Cell("debug", masking, "math", "off", 2)
        assert counted_flops(cell, torch.bfloat16)["fwd_flops_per_clip"] == analytic_flops(cell)["fwd_flops_per_clip"]


def test_dual_masking_saves_less_at_full_size_for_base():
    """ViT-B, 16 frames, on fake tensors: encoder-only keeps more per clip than dual, most with `math`."""
    saved = {(k, m): fake_step(Cell("B", m, k, "off", 1), torch.bfloat16)["saved_activation_bytes"]
             for k in ("math", "sdpa") for m in ("encoder_only", "dual")}
    math_ratio = saved["math", "encoder_only"] / saved["math", "dual"]
    sdpa_ratio = saved["sdpa", "encoder_only"] / saved["sdpa", "dual"]
    assert math_ratio > sdpa_ratio > 1.0
