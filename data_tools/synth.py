"""Small real H.264 clips with moving patterns, for tests and CPU demos (written by PyAV)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def _frame(rng_params: np.ndarray, t: int, h: int, w: int) -> np.ndarray:
    """A drifting colour gradient plus a square moving on a straight line: learnable motion."""
    fx, fy, vx, vy, r, g, b, size = rng_params
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    phase = t * 0.15
    img[..., 0] = 127 + 100 * np.sin(xx * fx + phase)
    img[..., 1] = 127 + 100 * np.sin(yy * fy - phase)
    img[..., 2] = 127 + 100 * np.sin((xx + yy) * 0.05 + phase * 0.5)
    s = int(size)
    x0 = int((w / 4 + vx * t) % (w - s))
    y0 = int((h / 4 + vy * t) % (h - s))
    img[y0:y0 + s, x0:x0 + s] = (r, g, b)
    return img.clip(0, 255).astype(np.uint8)


def write_video(path: Path, frames: int, size: tuple[int, int], fps: int, seed: int,
                gop: int = 8, faststart: bool = False) -> Path:
    """Write one H.264 mp4 of `frames` frames, size (H, W) (even numbers, yuv420p).

    faststart puts the index (moov) before the frames, as streaming sites do.
    """
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {h}x{w}")
    rng = np.random.default_rng(seed)
    params = np.array([rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(-3, 3),
                       rng.uniform(-3, 3), *rng.integers(0, 256, 3), max(4, min(h, w) // 4)])
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"g": str(gop), "preset": "ultrafast", "threads": "1"}
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(_frame(params, t, h, w), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_videos(out_dir: str | Path, n: int, *, frames: int = 40, size: tuple[int, int] = (96, 128),
                fps: int = 25, seed: int = 0) -> list[Path]:
    """Write `n` clips `clip_00000.mp4`... into `out_dir`; clip i uses seed + i (reproducible)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_video(out / f"clip_{i:05d}.mp4", frames, size, fps, seed + i) for i in range(n)]
