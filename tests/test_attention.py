"""Attention kernels: math vs sdpa parity (values and gradients), `auto` resolution, clear errors."""

from __future__ import annotations

import logging

import pytest
import torch

from vmae_ds.attention import KernelChoice, flash_attn_available, resolve_kernel
from vmae_ds.models import create_pretrain_model
from vmae_ds.models.vit import Attention

# fp32: a few ulps of accumulated rounding; bf16: ~2-4 bf16 ulps at |x| ~ 2
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _qkv(b: int, heads: int, n: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g, device=device).to(dtype).requires_grad_()
            for _ in range(3)]


def _run(kernel: str, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = KernelChoice(kernel)(q, k, v)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim,n", [(64, 50), (88, 37), (16, 8)])
def test_math_vs_sdpa_forward_and_grad(dtype, head_dim, n):
    q, k, v = _qkv(2, 3, n, head_dim, dtype)
    grad_out = torch.randn(2, 3, n, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    out_m, grads_m = _run("math", q, k, v, grad_out)
    out_s, grads_s = _run("sdpa", q, k, v, grad_out)
    assert out_m.dtype == out_s.dtype == dtype
    assert out_m.std() > 0.1  # attention is not saturated into a trivial average
    torch.testing.assert_close(out_s, out_m, **TOL[dtype])
    for gm, gs, name in zip(grads_m, grads_s, "qkv"):
        torch.testing.assert_close(gs, gm, **TOL[dtype], msg=f"d{name}")


def test_math_kernel_is_softmax_attention():
    """Reference: the explicit formula with float64, so both kernels are checked against ground truth."""
    q, k, v = _qkv(1, 2, 7, 88, torch.float64)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 88**0.5, dim=-1) @ v
    for kernel in ("math", "sdpa"):
        torch.testing.assert_close(KernelChoice(kernel)(q, k, v), expected)


@pytest.mark.parametrize("dim,heads", [(1408 // 16 * 2, 2), (96, 3)])  # head_dim 88 (ViT-g) and 32
def test_attention_module_parity(dim, heads):
    torch.manual_seed(0)
    mods = {}
    for kernel in ("math", "sdpa"):
        torch.manual_seed(0)
        mods[kernel] = Attention(dim, heads, KernelChoice(kernel))
        with torch.no_grad():  # non-zero q/v biases so the bias layout is exercised
            mods[kernel].q_bias.normal_()
            mods[kernel].v_bias.normal_()
    x = torch.randn(2, 19, dim)
    outs = {k: m(x) for k, m in mods.items()}
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=2e-6, rtol=2e-5)
    for out in outs.values():
        out.square().sum().backward()
    for (name, pm), ps in zip(mods["math"].named_parameters(), mods["sdpa"].parameters()):
        torch.testing.assert_close(ps.grad, pm.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_auto_on_cpu_is_sdpa_and_reported(caplog):
    q, k, v = _qkv(1, 2, 5, 16, torch.float32)
    choice = KernelChoice("auto")
    assert choice.used is None
    with caplog.at_level(logging.INFO, logger="vmae_ds.attention"):
        choice(q, k, v)
        choice(q, k, v)
    assert choice.used == "sdpa" and choice.requested == "auto"
    assert sum("attention kernel: sdpa" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert resolve_kernel("auto", q.to(torch.bfloat16)) == "sdpa"  # CPU bf16: still sdpa

    model = create_pretrain_model("vit_tiny_debug")  # default attention = auto
    mask = torch.zeros(1, 32, dtype=torch.bool)
    mask[:, ::2] = True
    model(torch.randn(1, 3, 4, 32, 32), mask)
    assert model.kernel.used == "sdpa"


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_attn_unavailable_fails_at_build():
    with pytest.raises(RuntimeError, match="flash-attn package is not installed"):
        create_pretrain_model("vit_tiny_debug", attention="flash_attn")
    with pytest.raises(RuntimeError, match="flash-attn"):
        KernelChoice("flash_attn")


def test_flash_attn_rejects_cpu_tensors():
    q = torch.zeros(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match="needs CUDA fp16/bf16"):
        resolve_kernel("flash_attn", q)
    with pytest.raises(ValueError, match="attention must be one of"):
        KernelChoice("flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCudaKernels:
    @pytest.mark.parametrize("head_dim", [64, 88])
    def test_sdpa_and_flash_match_math_bf16(self, head_dim):
        q, k, v = _qkv(2, 4, 333, head_dim, torch.bfloat16, device="cuda")
        grad_out = torch.randn(2, 4, 333, head_dim, device="cuda", dtype=torch.bfloat16)
        ref = [(q.float(), k.float(), v.float())]
        out_ref, grads_ref = _run("math", *ref[0], grad_out.float())
        kernels = ["math", "sdpa"] + (["flash_attn"] if flash_attn_available() else [])
        for kernel in kernels:
            out, grads = _run(kernel, q, k, v, grad_out)
            torch.testing.assert_close(out.float(), out_ref, atol=2e-2, rtol=2e-2, msg=kernel)
            for g, gr in zip(grads, grads_ref):
                torch.testing.assert_close(g.float(), gr, atol=8e-2, rtol=5e-2, msg=kernel)

    def test_auto_on_cuda(self):
        q = torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
        expected = "flash_attn" if flash_attn_available() else "sdpa"
        assert resolve_kernel("auto", q) == expected
        assert resolve_kernel("auto", q.float()) == "sdpa"

    def test_model_forward_cuda_kernels_agree(self):
        torch.manual_seed(0)
        model = create_pretrain_model("vit_tiny_debug", attention="math", dim=88 * 2, num_heads=2).cuda()
        mask = torch.zeros(2, 32, dtype=torch.bool, device="cuda")
        mask[:, 1::2] = True
        video = torch.randn(2, 3, 4, 32, 32, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = model(video, mask).float()
            for kernel in ["sdpa"] + (["flash_attn"] if flash_attn_available() else []):
                model.kernel.requested = kernel
                torch.testing.assert_close(model(video, mask).float(), ref, atol=5e-2, rtol=5e-2, msg=kernel)
