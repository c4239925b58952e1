"""Attention kernels behind one setting: auto | flash_attn | sdpa | math.

`math` materialises the (N x N) score matrix like the official code; the benchmark needs it to show
the memory behaviour the paper measured. A requested kernel that cannot run raises; nothing falls
back silently. `auto` picks the fastest kernel for the tensors it sees and logs the choice once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

KERNELS = ("auto", "flash_attn", "sdpa", "math")
log = logging.getLogger(__name__)


@functools.cache
def _has_module(name: str) -> bool:
    # asked once per process: a find_spec on every attention call costs host time in every step
    return importlib.util.find_spec(name) is not None


def flash_attn_available() -> bool:
    return _has_module("flash_attn") or _has_module("flash_attn_interface")


def check_kernel(name: str) -> None:
    """Fail early (at model build) for a kernel this machine cannot provide."""
    if name not in KERNELS:
        raise ValueError(f"attention must be one of {KERNELS}, got {name!r}")
    if name == "flash_attn" and not flash_attn_available():
        raise RuntimeError("attention='flash_attn' requested but the flash-attn package is not installed "
                           "(pip install -r requirements-gpu.txt on a CUDA machine), or use 'sdpa'")


def resolve_kernel(name: str, q: torch.Tensor) -> str:
    """The concrete kernel `name` means for this tensor's device and dtype."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        return "flash_attn" if (q.is_cuda and half and flash_attn_available()) else "sdpa"
    if name == "flash_attn" and not (q.is_cuda and half):
        raise RuntimeError(f"attention='flash_attn' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    return name


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # flash-attn takes (B, N, H, D); prefer FA3 (Hopper) when installed.
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if _has_module("flash_attn_interface"):
        from flash_attn_interface import flash_attn_func
        out = flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    else:
        from flash_attn import flash_attn_func
        out = flash_attn_func(q, k, v)
    return out.transpose(1, 2)


def _math_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


class KernelChoice:
    """Shared by all attention layers of one model: the requested kernel and what actually ran."""

    def __init__(self, requested: str = "auto"):
        check_kernel(requested)
        self.requested = requested
        self.used: str | None = None
        self._resolved: dict[tuple[str, torch.dtype, str], str] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        key = (q.device.type, q.dtype, self.requested)
        kernel = self._resolved.get(key)
        if kernel is None:
            kernel = self._resolved[key] = resolve_kernel(self.requested, q)
        if kernel != self.used:
            if self.used is None:
                log.info("attention kernel: %s (requested %s, %s %s, head_dim %d)", kernel, self.requested,
                         q.device.type, str(q.dtype).replace("torch.", ""), q.shape[-1])
            self.used = kernel
        if kernel == "flash_attn":
            return _flash_attn(q, k, v)
        if kernel == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        return _math_attn(q, k, v)
