"""Which frames make a clip: the training draw and the test-time views, for stride and segment sampling.

All indices are absolute frame numbers in the window [start, end) and never reach past its last frame.

Stride sampling (VideoMAE): `num_frames` frames `stride` apart.
- training, `spacing="exact"`: i * stride from a random start where the whole span fits (the authors'
  pretraining loader); `spacing="linspace"`: num_frames points of a linspace over a random window of
  num_frames x stride frames, truncated to integers, the last clamped inside it (their fine-tuning loader,
  spacing 64/15 frames for 16 x 4); a window shorter than that: a linspace over it with
  len // stride points, the last frame repeated.
- test views, `style="authors"`: the window's frames subsampled at the stride, view c of n starting at
  int(c x (count - num_frames) / (n - 1)) on that grid (their test loader); `style="even"`: starts spread
  evenly (rounded) over every frame offset where the span fits.

Segment sampling (TSN, UMT): the window cut into `num_frames` segments, one frame from each, three styles:
- `tsn`: segments of floor(L / T) frames from the window's start (what is left after T of them is unused),
  a random frame of each in training; test view c of n at int(tick x (i + c / n)), tick = L / T
  (VideoMAE V2's SSv2 fine-tuning, UMT's pretraining and SSv2). A window shorter than T frames: its frames
  in order after repeats of the first.
- `sparse`: UMT's Kinetics fine-tuning: s = (L - 1) / T, segment i spans round(s i) .. round(s (i + 1))
  inclusive (a random frame of it in training); test view c at round(s i) + int(s (c + 1) / (n + 1)).
- `even`: T segments of proportional length [L i // T, L (i + 1) // T) covering every frame (each at least
  one frame long), a random frame of each in training; test view c at (c + 0.5) / n of a segment.
"""

from __future__ import annotations

import numpy as np
import torch

SEGMENT_STYLES = ("tsn", "sparse", "even")
STRIDE_SPACINGS = ("exact", "linspace")
STRIDE_VIEWS = ("authors", "even")


def randint_below(n: int, gen: torch.Generator) -> int:
    """Uniform in [0, n) from `gen` (0 without a draw when n <= 1)."""
    return int(torch.randint(0, n, (1,), generator=gen)) if n > 1 else 0


def clip_indices(start: int, end: int, num_frames: int, stride: int, offset: int) -> list[int]:
    """num_frames indices from `start + offset`, `stride` apart, clamped to the window's last frame."""
    return [min(start + offset + i * stride, end - 1) for i in range(num_frames)]


def train_indices(start: int, end: int, num_frames: int, stride: int, gen: torch.Generator,
                  spacing: str = "exact") -> list[int]:
    """The training draw of stride sampling (see the module docstring for the two spacings)."""
    if spacing == "exact":
        span = (num_frames - 1) * stride + 1
        return clip_indices(start, end, num_frames, stride, randint_below(max(end - start - span + 1, 1), gen))
    if spacing != "linspace":
        raise ValueError(f"spacing must be one of {STRIDE_SPACINGS}, got {spacing!r}")
    length, window = end - start, num_frames * stride
    if length <= window:
        idx = np.linspace(0, length, num=length // stride)
        idx = np.concatenate([idx, np.full(num_frames - len(idx), float(length))])
        rel = np.clip(idx, 0, length - 1).astype(np.int64)
    else:
        last = window + randint_below(length - window, gen)  # the window's exclusive end, in [window, length)
        first = last - window
        rel = np.clip(np.linspace(first, last, num=num_frames), first, last - 1).astype(np.int64)
    return [start + int(i) for i in rel]


def eval_indices(start: int, end: int, num_frames: int, stride: int, num_clips: int,
                 style: str = "authors") -> list[list[int]]:
    """num_clips test-time views of stride sampling (see the module docstring for the two styles)."""
    if style == "even" or num_clips == 1:  # one view: centred (the authors' loader divides by n - 1)
        span = (num_frames - 1) * stride + 1
        room = max(end - start - span, 0)
        offs = [room // 2] if num_clips == 1 else [round(c * room / (num_clips - 1)) for c in range(num_clips)]
        return [clip_indices(start, end, num_frames, stride, o) for o in offs]
    if style != "authors":
        raise ValueError(f"style must be one of {STRIDE_VIEWS}, got {style!r}")
    grid = list(range(start, end, stride))
    grid += [grid[-1]] * max(num_frames - len(grid), 0)
    step = max((len(grid) - num_frames) / (num_clips - 1), 0.0)
    return [grid[int(c * step):int(c * step) + num_frames] for c in range(num_clips)]


def segment_indices(start: int, end: int, num_frames: int, gen: torch.Generator | None,
                    style: str = "tsn") -> list[int]:
    """One frame per segment: a random one with `gen`; without it the segment's middle (tsn: floor(L/T) // 2
    into it, as the authors' validation; sparse: its first view of one; even: (len - 1) // 2 into it)."""
    length, last = max(end - start, 1), max(end - 1, start)
    if style == "tsn":
        seg = length // num_frames
        if seg == 0:
            rel = [0] * (num_frames - length) + list(range(length))
        else:
            rel = [i * seg + (randint_below(seg, gen) if gen is not None else seg // 2) for i in range(num_frames)]
        return [min(start + r, last) for r in rel]
    if style == "sparse":
        if gen is None:
            return eval_segment_indices(start, end, num_frames, 1, style)[0]
        s = max(0.0, (length - 1) / num_frames)
        out = []
        for i in range(num_frames):
            lo, hi = round(s * i), round(s * (i + 1))
            out.append(min(start + lo + randint_below(hi - lo + 1, gen), last))
        return out
    if style != "even":
        raise ValueError(f"segment style must be one of {SEGMENT_STYLES}, got {style!r}")
    out = []
    for i in range(num_frames):
        lo = start + length * i // num_frames
        hi = max(start + length * (i + 1) // num_frames, lo + 1)  # every segment holds at least one frame
        pick = randint_below(hi - lo, gen) if gen is not None else (hi - lo - 1) // 2
        out.append(min(lo + pick, last))
    return out


def eval_segment_indices(start: int, end: int, num_frames: int, num_clips: int,
                         style: str = "tsn") -> list[list[int]]:
    """Test-time views of segment sampling: num_clips shifted offsets within every segment (see the module
    docstring for where each style puts them)."""
    length, last = max(end - start, 1), max(end - 1, start)
    clips = []
    for c in range(num_clips):
        if style == "tsn":
            tick = length / num_frames
            rel = [int(c * tick / num_clips + tick * i) for i in range(num_frames)]
        elif style == "sparse":
            s = max(0.0, (length - 1) / num_frames)
            rel = [round(s * i) + int(s / (num_clips + 1) * (c + 1)) for i in range(num_frames)]
        elif style == "even":
            seg = length / num_frames
            rel = [int(seg * i + seg * ((c + 0.5) / num_clips)) for i in range(num_frames)]
        else:
            raise ValueError(f"segment style must be one of {SEGMENT_STYLES}, got {style!r}")
        clips.append([min(start + r, last) for r in rel])
    return clips
