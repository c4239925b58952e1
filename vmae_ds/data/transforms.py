"""Temporal sampling and spatial augmentation on uint8 tensors (no float on the CPU), plus GPU normalisation.

Spatial crops follow the authors' GroupMultiScaleCrop (TSN style): crop sides drawn from scales x short
side with |i - j| <= 1 between the height and width scale (so aspect ratio varies a little), sides
within 3 px of the output snapped to it, the offset chosen from 13 fixed positions, then a bilinear
resize to input_size x input_size. No flip in pretraining.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _randint(n: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, n, (1,), generator=gen)) if n > 1 else 0


def clip_indices(start: int, end: int, num_frames: int, stride: int, offset: int) -> list[int]:
    """num_frames indices from `start + offset`, `stride` apart, clamped to the window's last frame."""
    return [min(start + offset + i * stride, end - 1) for i in range(num_frames)]


def train_indices(start: int, end: int, num_frames: int, stride: int, gen: torch.Generator) -> list[int]:
    """Random start over all positions where the whole span fits (start 0 and clamping if none does)."""
    span = (num_frames - 1) * stride + 1
    return clip_indices(start, end, num_frames, stride, _randint(max(end - start - span + 1, 1), gen))


def segment_indices(start: int, end: int, num_frames: int, gen: torch.Generator | None) -> list[int]:
    """Sparse sampling: [start, end) cut into num_frames equal segments, one frame from each (a random one
    with `gen`, the middle one without). Frames repeat when the window is shorter than num_frames."""
    length, last = max(end - start, 1), max(end - 1, start)
    out = []
    for i in range(num_frames):
        lo = start + length * i // num_frames
        hi = max(start + length * (i + 1) // num_frames, lo + 1)  # every segment holds at least one frame
        pick = _randint(hi - lo, gen) if gen is not None else (hi - lo - 1) // 2
        out.append(min(lo + pick, last))
    return out


def eval_segment_indices(start: int, end: int, num_frames: int, num_clips: int) -> list[list[int]]:
    """Test-time views of sparse sampling: num_clips evenly shifted offsets within every segment."""
    length = max(end - start, 1)
    seg = length / num_frames
    clips = []
    for c in range(num_clips):
        frac = (c + 0.5) / num_clips
        clips.append([min(start + int(seg * i + seg * frac), end - 1 if end > start else start)
                      for i in range(num_frames)])
    return clips


def eval_indices(start: int, end: int, num_frames: int, stride: int, num_clips: int) -> list[list[int]]:
    """num_clips evenly spaced clips over the window (test-time temporal views)."""
    span = (num_frames - 1) * stride + 1
    room = max(end - start - span, 0)
    offs = [room // 2] if num_clips == 1 else [round(c * room / (num_clips - 1)) for c in range(num_clips)]
    return [clip_indices(start, end, num_frames, stride, o) for o in offs]


def multiscale_crop_box(h: int, w: int, size: int, scales: tuple[float, ...],
                        gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) as in GroupMultiScaleCrop(max_distort=1, fix_crop, more_fix_crop)."""
    base = min(h, w)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(sh, sw) for i, sh in enumerate(sides) for j, sw in enumerate(sides) if abs(i - j) <= 1]
    ch, cw = pairs[_randint(len(pairs), gen)]
    ch, cw = min(ch, h), min(cw, w)
    hs, ws = (h - ch) // 4, (w - cw) // 4
    offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),
               (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),
               (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws)]
    top, left = offsets[_randint(len(offsets), gen)]
    return top, left, ch, cw


def crop_resize(frames: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """frames uint8 (T, 3, H, W) -> uint8 (3, T, size, size). Bilinear, antialiased, uint8 kernels."""
    top, left, ch, cw = box
    x = frames[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(1, 0, 2, 3)


def crop_resize_thwc(frames: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Like crop_resize, but returns (T, size, size, 3): the decoder's channels-last memory order.

    The uint8 antialiased resize is fastest on channels-last input (decoder output is (T, H, W, 3)),
    and the one transposition to channels-first is done per batch by `stack_channels_first`.
    """
    top, left, ch, cw = box
    x = frames[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1)


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


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) with the short side scaled to `size`, aspect ratio kept."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    th, tw = max(size, round(h * scale)), max(size, round(w * scale))
    if (th, tw) == (h, w):
        return frames
    return F.interpolate(frames, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)


def spatial_views(frames: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """Test-time crops: short side -> size, then num_crops squares spread along the long side (3 = l/c/r)."""
    x = resize_short_side(frames, size)
    h, w = x.shape[-2:]
    views = []
    for k in range(num_crops):
        frac = 0.5 if num_crops == 1 else k / (num_crops - 1)
        if h > w:
            top, left = round((h - size) * frac), (w - size) // 2
        else:
            top, left = (h - size) // 2, round((w - size) * frac)
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
