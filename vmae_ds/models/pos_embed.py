"""The fixed 1-D sinusoid position table VideoMAE uses (not learned, not saved)."""

from __future__ import annotations

import torch


def sinusoid_table(num_positions: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, num_positions, dim): dim 2i = sin(pos / 10000^(2i/d)), dim 2i+1 = cos(same angle).

    Computed in float64 then cast, so the table matches the official numpy table to float32 rounding.
    """
    pos = torch.arange(num_positions, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(dim, device=device)
    exponent = (2 * torch.div(j, 2, rounding_mode="floor")).to(torch.float64) / dim
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64, device=device), exponent)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)
