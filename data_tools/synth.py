"""Small real clips with moving patterns, for tests and CPU demos (written by PyAV).

Codecs: H.264 (default), H.265, VP9 (in .webm) and AV1, with the encoders PyAV's FFmpeg bundles.
`stamp=True` draws each frame's number as black/white blocks along the top edge (`read_stamp` reads it
back, also after lossy re-encoding), so a test can tell which source frame a decoded frame is.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# codec -> (PyAV encoder, file suffix). Options per encoder are in _encoder_options.
CODECS = {"h264": ("libx264", ".mp4"), "h265": ("libx265", ".mp4"), "vp9": ("libvpx-vp9", ".webm"),
          "av1": ("libsvtav1", ".mp4")}
STAMP_BLOCK = 8  # side of one stamp bit in pixels: large enough to survive 4:2:0 and lossy coding


def codec_available(codec: str) -> bool:
    """Whether PyAV's FFmpeg has the encoder that `write_video(codec=...)` needs."""
    try:
        av.codec.Codec(CODECS[codec][0], "w")
    except (av.FFmpegError, ValueError, KeyError):
        return False
    return True


def _encoder_options(codec: str, gop: int, bframes: int) -> dict[str, str]:
    # One thread and fixed GOPs everywhere: small, reproducible files with keyframes every `gop` frames.
    if codec == "h264":
        return {"g": str(gop), "preset": "ultrafast", "threads": "1", "bf": str(bframes)}
    if codec == "h265":
        return {"preset": "ultrafast", "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:"
                f"bframes={bframes}:pools=1:frame-threads=1:log-level=error"}
    if codec == "vp9":
        return {"g": str(gop), "deadline": "realtime", "cpu-used": "8", "threads": "1", "lag-in-frames": "0"}
    if codec == "av1":  # presets above 8 skip small changes between frames, such as the stamp's blocks
        return {"g": str(gop), "preset": "8", "crf": "20"}
    raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")


def _stamp(img: np.ndarray, t: int) -> None:
    """Frame number t as bits, most significant first, in rows of STAMP_BLOCK-sized blocks (2 rows)."""
    per_row = img.shape[1] // STAMP_BLOCK
    if t >= 1 << (2 * per_row):
        raise ValueError(f"frame {t} does not fit a stamp of {2 * per_row} bits (width {img.shape[1]})")
    for bit in range(2 * per_row):
        y, x = divmod(bit, per_row)
        on = (t >> (2 * per_row - 1 - bit)) & 1
        img[y * STAMP_BLOCK:(y + 1) * STAMP_BLOCK, x * STAMP_BLOCK:(x + 1) * STAMP_BLOCK] = 255 * on


def read_stamp(frame: np.ndarray) -> int:
    """The frame number a stamped frame (H, W, 3) or (3, H, W) carries; reads the middle of each block."""
    img = frame if frame.shape[-1] == 3 else np.moveaxis(frame, 0, -1)
    per_row = img.shape[1] // STAMP_BLOCK
    q = STAMP_BLOCK // 4
    t = 0
    for bit in range(2 * per_row):
        y, x = divmod(bit, per_row)
        block = img[y * STAMP_BLOCK + q:(y + 1) * STAMP_BLOCK - q, x * STAMP_BLOCK + q:(x + 1) * STAMP_BLOCK - q]
        t = (t << 1) | int(block.astype(np.float32).mean() > 127)
    return t


def _frame(rng_params: np.ndarray, t: int, h: int, w: int, start: tuple[float, float] | None = None) -> np.ndarray:
    """A drifting colour gradient plus a square moving on a straight line: learnable motion.

    `start` (x, y) of the square; default (w/4, h/4), and the square then wraps around the frame. With a
    start (the motion classes) the gradient stands still: the square's run is the only motion."""
    fx, fy, vx, vy, r, g, b, size = rng_params
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    phase = t * 0.15 if start is None else 0.0
    img[..., 0] = 127 + 100 * np.sin(xx * fx + phase)
    img[..., 1] = 127 + 100 * np.sin(yy * fy - phase)
    img[..., 2] = 127 + 100 * np.sin((xx + yy) * 0.05 + phase * 0.5)
    s = int(size)
    sx, sy = start if start is not None else (w / 4, h / 4)
    x0 = int((sx + vx * t) % (w - s + (1 if start is not None else 0)))
    y0 = int((sy + vy * t) % (h - s + (1 if start is not None else 0)))
    if start is not None:  # motion classes: a dark frame around the square keeps it visible on any background
        img[max(y0 - 2, 0):y0 + s + 2, max(x0 - 2, 0):x0 + s + 2] = 0
    img[y0:y0 + s, x0:x0 + s] = (r, g, b)
    return img.clip(0, 255).astype(np.uint8)


# moving-square directions of the motion classes: (dx, dy) per class, in this order
MOTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def write_video(path: Path, frames: int, size: tuple[int, int], fps: int, seed: int,
                gop: int = 8, faststart: bool = False, codec: str = "h264", bframes: int = 0,
                stamp: bool = False, motion: str | None = None) -> Path:
    """Write one clip of `frames` frames, size (H, W) (even numbers, yuv420p), keyframe every `gop`.

    codec: one of CODECS; the container follows the path's suffix (.mp4, .webm, .mkv). bframes: B-frames
    between references (H.264 / H.265). faststart puts the mp4 index (moov) before the frames, as
    streaming sites do. stamp: write the frame number into the top rows (see read_stamp). motion: one of
    MOTIONS: the square runs straight that way without wrapping, at a random speed from a random start, so
    only the direction tells such clips apart (colours and background stay random).
    """
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sizes, got {h}x{w}")
    options = _encoder_options(codec, gop, bframes)  # checks the codec name first
    rng = np.random.default_rng(seed)
    params = np.array([rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(-3, 3),
                       rng.uniform(-3, 3), *rng.integers(0, 256, 3), max(4, min(h, w) // 4)])
    start = None
    if motion is not None:
        dx, dy = MOTIONS[motion]
        side = int(params[7])
        travel_x, travel_y = (w - side) * rng.uniform(0.75, 1.0), (h - side) * rng.uniform(0.75, 1.0)
        params[2], params[3] = dx * travel_x / max(frames - 1, 1), dy * travel_y / max(frames - 1, 1)
        # start so that the run stays inside: the room left over is spread at random
        sx = rng.uniform(0, w - side - abs(dx) * travel_x) + (travel_x if dx < 0 else 0)
        sy = rng.uniform(0, h - side - abs(dy) * travel_y) + (travel_y if dy < 0 else 0)
        start = (sx, sy)
    with av.open(str(path), mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(CODECS[codec][0], rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = options
        for t in range(frames):
            img = _frame(params, t, h, w, start)
            if stamp:
                _stamp(img, t)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def make_videos(out_dir: str | Path, n: int, *, frames: int = 40, size: tuple[int, int] = (96, 128),
                fps: int = 25, seed: int = 0, codec: str = "h264") -> list[Path]:
    """Write `n` clips `clip_00000.mp4`... into `out_dir` (.webm for VP9); clip i uses seed + i (reproducible)."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = CODECS[codec][1]
    return [write_video(out / f"clip_{i:05d}{suffix}", frames, size, fps, seed + i, codec=codec) for i in range(n)]


def make_motion_videos(out_dir: str | Path, n_per_class: int, classes: int = 4, *, frames: int = 16,
                       size: tuple[int, int] = (64, 64), fps: int = 25, seed: int = 0,
                       codec: str = "h264") -> list[Path]:
    """`n_per_class` clips per motion class into `out_dir/<class>/` (right, left, down, up): a labelled set
    whose class only motion tells apart (`vmae-shards manifest --labels-from-dirs` labels it)."""
    if not 1 <= classes <= len(MOTIONS):
        raise ValueError(f"--motion-classes must be in [1, {len(MOTIONS)}], got {classes}")
    suffix, out, paths = CODECS[codec][1], Path(out_dir), []
    for c, name in enumerate(list(MOTIONS)[:classes]):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            paths.append(write_video(out / name / f"{name}_{i:04d}{suffix}", frames, size, fps,
                                     seed + 10_000 * c + i, codec=codec, motion=name))
    return paths
