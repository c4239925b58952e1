"""Spatial augmentation on uint8 tensors (no float on the CPU), plus GPU normalisation (temporal sampling:
sampling.py).

Spatial crops follow the authors' GroupMultiScaleCrop (TSN style): crop sides drawn from scales x short
side with |i - j| <= 1 between the height and width scale (so aspect ratio varies a little), sides
within 3 px of the output snapped to it, the offset chosen from 13 fixed positions, then a bilinear
resize to input_size x input_size. No flip in pretraining.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vmae_ds.data.sampling import (  # noqa: F401  (temporal sampling moved there; its names stay importable)
    clip_indices,
    eval_indices,
    eval_segment_indices,
    randint_below,
    segment_indices,
    train_indices,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def multiscale_crop_box(h: int, w: int, size: int, scales: tuple[float, ...],
                        gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) as in GroupMultiScaleCrop(max_distort=1, fix_crop, more_fix_crop)."""
    base = min(h, w)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(sh, sw) for i, sh in enumerate(sides) for j, sw in enumerate(sides) if abs(i - j) <= 1]
    ch, cw = pairs[randint_below(len(pairs), gen)]
    ch, cw = min(ch, h), min(cw, w)
    hs, ws = (h - ch) // 4, (w - cw) // 4
    offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),
               (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),
               (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws)]
    top, left = offsets[randint_below(len(offsets), gen)]
    return top, left, ch, cw


def crop_resize(frames: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """frames uint8 (T, 3, H, W) -> uint8 (3, T, size, size). Bilinear, antialiased, uint8 kernels."""
    top, left, ch, cw = box
    x = frames[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (size, size):
        x = resize_uint8(x, (size, size))
    return x.permute(1, 0, 2, 3)


def crop_resize_thwc(frames: torch.Tensor, box: tuple[int, int, int, int], size: int,
                     antialias: bool = True) -> torch.Tensor:
    """Like crop_resize, but returns (T, size, size, 3): the decoder's channels-last memory order.

    The uint8 antialiased resize is fastest on channels-last input (decoder output is (T, H, W, 3)),
    and the one transposition to channels-first is done per batch by `stack_channels_first`.
    """
    top, left, ch, cw = box
    x = frames[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (size, size):
        x = resize_uint8(x, (size, size), antialias)
    return x.permute(0, 2, 3, 1)


def resize_uint8(x: torch.Tensor, size_hw: tuple[int, int], antialias: bool = True,
                 mode: str = "bilinear") -> torch.Tensor:
    """uint8 (N, 3, H, W) resized. antialias: torch's uint8 antialiased kernel (PIL's resize, as the authors'
    pretraining crops); without: the float resize rounded back to uint8 (within half a level of the authors'
    fine-tuning crops, which resize floats, and of their test views, cv2's bilinear without antialiasing)."""
    if antialias:
        return F.interpolate(x, size=size_hw, mode=mode, align_corners=False, antialias=True)
    y = F.interpolate(x.float(), size=size_hw, mode=mode, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def stack_channels_first(crops_thwc: list[torch.Tensor]) -> torch.Tensor:
    """[(T, S, S, 3)] * B -> uint8 (B, 3, T, S, S) contiguous, one plane copy per channel.

    numpy's strided copy does this transposition about 3x faster than torch.stack of permuted views.
    """
    t, h, w, _ = crops_thwc[0].shape
    out = np.empty((len(crops_thwc), 3, t, h, w), dtype=np.uint8)
    for i, crop in enumerate(crops_thwc):
        src = crop.numpy()
        for c in range(3):
            out[i, c] = src[..., c]
    return torch.from_numpy(out)


def to_tchw(frames_thwc) -> torch.Tensor:
    """Decoder output (T, H, W, 3) uint8 numpy -> (T, 3, H, W) tensor view (no copy)."""
    return torch.from_numpy(frames_thwc).permute(0, 3, 1, 2)


def resize_short_side(frames: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """uint8 (T, 3, H, W) with the short side scaled to `size`, the long side to int(size x long / short)
    (truncated, as the authors' test resize)."""
    h, w = frames.shape[-2:]
    th, tw = (int(size * h / w), size) if w < h else (size, int(size * w / h))
    if (th, tw) == (h, w):
        return frames
    return resize_uint8(frames, (th, tw), antialias)


def spatial_views(frames: torch.Tensor, size: int, num_crops: int, antialias: bool = True) -> list[torch.Tensor]:
    """Test-time crops: short side -> size, then num_crops squares along the long side (3 = l/c/r), crop k of
    n at int(k x (long - size) / (n - 1)) as the authors' test loader (one crop: centred)."""
    x = resize_short_side(frames, size, antialias)
    h, w = x.shape[-2:]
    views = []
    for k in range(num_crops):
        along = max(h, w) - size
        off = along // 2 if num_crops == 1 else int(k * (along / (num_crops - 1)))
        top, left = (off, (w - size) // 2) if h > w else ((h - size) // 2, off)
        views.append(x[:, :, top:top + size, left:left + size].permute(1, 0, 2, 3))
    return views


def normalize_on_device(video_uint8: torch.Tensor, dtype: torch.dtype = torch.float32,
                        stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 (B, 3, T, H, W) on any device -> ImageNet-normalised float `dtype`, same shape.

    Move the uint8 batch to the GPU first (4x fewer bytes over PCIe), then call this there. `stats`: the
    (mean, std) of `pixel_stats(device)`, made once per run (no host-to-device copy per call).
    """
    if video_uint8.dtype != torch.uint8 or video_uint8.dim() != 5 or video_uint8.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, T, H, W), got {video_uint8.dtype} {tuple(video_uint8.shape)}")
    mean, std = stats if stats is not None else pixel_stats(video_uint8.device)
    return ((video_uint8.float() - mean) / std).to(dtype)


def pixel_stats(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in 0..255 units as float32 (1, 3, 1, 1, 1) tensors on `device`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1, 1) * 255
    return mean, std
