"""The fixed 1-D sinusoid position table VideoMAE uses (not learned, not saved)."""

from __future__ import annotations

import numpy as np
import torch


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
