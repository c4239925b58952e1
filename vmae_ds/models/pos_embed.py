"""The fixed 1-D sinusoid position table VideoMAE uses (not learned, not saved)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sinusoid_table(num_positions: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, num_positions, dim) float32: dim 2i = sin(pos / 10000^(2i/d)), dim 2i+1 = cos(same angle).

    Computed in float64 numpy, as the authors do. Not with torch constructors: inside
    `deepspeed.zero.Init` those are replaced by versions that cast every float tensor to the run's dtype,
    float64 included, and a bf16 `arange` collapses positions above 256 (581 distinct rows of 1568).
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    exponent = 2 * (np.arange(dim) // 2) / dim
    angle = pos / np.power(10000.0, exponent)[None, :]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)
    out = torch.from_numpy(table).unsqueeze(0)
    return out if device is None else out.to(device)


def interpolated_table(source_grid: tuple[int, int, int], grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """(1, T*H*W, dim) float32: the sinusoid table of `source_grid` (t, h, w) resampled to `grid`, bicubic in
    space then linear in time (align_corners False), as UMT's fine-tuning adapts its pretraining table; equal to
    `sinusoid_table` when the grids agree. Numpy and functional ops only (safe inside zero.Init)."""
    t0, h0, w0 = source_grid
    t, h, w = grid
    table = sinusoid_table(t0 * h0 * w0, dim)
    if tuple(source_grid) == tuple(grid):
        return table
    x = table.reshape(t0, h0, w0, dim)
    if (h0, w0) != (h, w):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    if t0 != t:
        x = F.interpolate(x.permute(1, 2, 3, 0).reshape(h * w, dim, t0), size=t, mode="linear", align_corners=False)
        x = x.reshape(h, w, dim, t).permute(3, 0, 1, 2)
    return x.reshape(1, t * h * w, dim).contiguous()
