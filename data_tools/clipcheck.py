"""Per-clip work of the shard builder: read, trial-decode, optionally re-encode. Runs in worker processes."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import decord

from data_tools.manifest import VIDEO_EXTS, ClipRow

VIDEO_EXT_NAMES = {e.lstrip(".") for e in VIDEO_EXTS}


@dataclass(frozen=True)
class ClipSettings:
    reencode: bool = False
    short_side: int = 320
    keyint: int = 16
    crf: int = 23
    min_frames: int = 16
    full_check: bool = False  # decode every frame of the window, not only its first, middle and last


@dataclass
class ClipResult:
    row: int
    key: str
    ok: bool
    reason: str = ""
    ext: str = ""
    video: bytes = b""
    meta: dict | None = None


class BadClip(Exception):
    """A clip that must be skipped; str(e) is the reason written to the errors file."""


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(row: int, path: str) -> str:
    """Unique (row index), safe (letters, digits, _ and - only: no dots, no slashes) and readable."""
    stem = _UNSAFE.sub("_", Path(path).stem).strip("_")[:48] or "clip"
    return f"{row:09d}_{stem}"


# FFmpeg's own words, found inside decord's multi-line errors, mapped to a plain reason.
_KNOWN = (("moov atom not found", "moov atom not found (truncated or unfinished mp4)"),
          ("Invalid data found when processing input", "invalid data (not a video container)"),
          ("could not find codec parameters", "no decodable video stream"),
          ("Cannot find a valid video stream", "no video stream"))


_LOG_PREFIX = re.compile(r"(\[\d\d:\d\d:\d\d\] \S+:\d+: )+")  # decord's "[12:00:00] file.cc:83: "


def _first_line(e: BaseException) -> str:
    text = str(e)
    for needle, reason in _KNOWN:
        if needle.lower() in text.lower():
            return reason
    lines = [_LOG_PREFIX.sub("", line) for line in text.strip().splitlines()]
    return (lines[0] if lines else type(e).__name__)[:200]


def probe(data: bytes, min_frames: int, window: tuple[int, int | None] = (0, None), full: bool = False) -> dict:
    """Open with decord (the loader's reader) and decode the first, middle and last frame of the window.

    Reading the last frame catches truncated files whose index is intact; an unreadable index fails
    at open. Returns fps, frame count, width, height and the usable frame window.
    """
    try:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        n = len(vr)
    except Exception as e:  # decord raises bare RuntimeError / DECORDError
        reason = _pyav_reason(data)
        if reason is None:  # FFmpeg opens it and decodes its start: the rest is missing or broken
            raise BadClip(f"damaged or truncated video ({_first_line(e)})") from None
        raise BadClip(f"not a decodable video: {reason}") from None
    if n <= 0:
        raise BadClip("no video frames")
    start = max(0, window[0])
    end = n if window[1] is None else min(n, window[1])
    if end - start < min_frames:
        raise BadClip(f"too short: {end - start} frames in window [{start}, {end}) < --min-frames {min_frames}")
    wanted = sorted({start, (start + end) // 2, end - 1})
    try:
        frames = vr.get_batch(wanted).asnumpy()
        for a in range(start, end, 32) if full else ():  # in chunks: a long clip needs no GBs of RAM
            wanted = list(range(a, min(a + 32, end)))
            vr.get_batch(wanted)
    except Exception:
        # The index opened but the frames are not all there: typically a file cut short.
        raise BadClip(f"damaged or truncated video: frames {wanted} of {n} not all decodable") from None
    h, w = frames.shape[1:3]
    return {"fps": float(vr.get_avg_fps()), "num_frames": n, "width": int(w), "height": int(h),
            "frame_start": start, "frame_end": end}


def _pyav_reason(data: bytes) -> str | None:
    """decord's errors say little ('Error reading N bytes...'); FFmpeg via PyAV names the problem."""
    if data[4:8] == b"ftyp" and b"moov" not in data:
        return "truncated or unfinished mp4 (no moov index box)"
    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                return "no video stream"
            for _ in c.decode(video=0):
                break
    except Exception as e:
        return _first_line(e)
    return None


def reencode(data: bytes, short_side: int, keyint: int, crf: int) -> bytes:
    """H.264 (PyAV's bundled FFmpeg), short side scaled down to `short_side`, keyframe every `keyint`.

    Every frame is decoded here, so this is also a full trial decode. Single-threaded x264 keeps the
    output byte-identical between runs (resume determinism); parallelism comes from processes.
    """
    out = io.BytesIO()
    try:
        with av.open(io.BytesIO(data)) as src:
            vin = src.streams.video[0]
            rate = vin.average_rate or vin.guessed_rate or Fraction(25)
            with av.open(out, mode="w", format="mp4") as dst:
                vout = None
                n = 0
                for frame in src.decode(vin):
                    if vout is None:
                        w, h = frame.width, frame.height
                        scale = min(1.0, short_side / min(w, h))
                        tw, th = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
                        vout = dst.add_stream("libx264", rate=rate)
                        vout.width, vout.height, vout.pix_fmt = tw, th, "yuv420p"
                        vout.options = {"g": str(keyint), "crf": str(crf), "preset": "veryfast",
                                        "threads": "1", "bf": "0"}
                    img = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
                    img.pts, img.time_base = n, Fraction(1) / Fraction(rate)
                    dst.mux(vout.encode(img))
                    n += 1
                if vout is None:
                    raise BadClip("no video frames")
                dst.mux(vout.encode())
    except BadClip:
        raise
    except Exception as e:
        raise BadClip(f"not a decodable video (re-encode): {_first_line(e)}") from None
    return out.getvalue()


def _window(row: ClipRow, fps_hint: float | None) -> tuple[int, int | None]:
    """Frame window from the manifest: start_frame (+num_frames), or start/end seconds."""
    if row.start_frame is not None:
        end = row.start_frame + row.num_frames if row.num_frames else None
        return row.start_frame, end
    if (row.start is not None or row.end is not None) and fps_hint:
        s = int(round((row.start or 0.0) * fps_hint))
        return s, (int(round(row.end * fps_hint)) if row.end is not None else None)
    return 0, None


def process_clip(task: tuple[int, dict, str, ClipSettings]) -> ClipResult:
    """Worker entry point: one manifest row -> the sample to store, or the reason it is skipped."""
    index, row_dict, path, settings = task
    row = ClipRow(**row_dict)
    key = sample_key(index, row.path)
    try:
        if not os.path.exists(path):
            raise BadClip("missing file")
        if os.path.isdir(path):
            raise BadClip("is a folder, not a file")
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise BadClip("empty file (0 bytes)")
        ext = Path(path).suffix.lower().lstrip(".")
        if ext not in VIDEO_EXT_NAMES:
            ext = "mp4"  # only a member name: decoders recognise the container from the bytes
        if settings.reencode:
            data, ext = reencode(data, settings.short_side, settings.keyint, settings.crf), "mp4"
        if row.start is None and row.end is None and row.start_frame is None:
            info = probe(data, settings.min_frames, full=settings.full_check and not settings.reencode)
        else:  # a window in seconds needs the fps, hence an open reader first
            window = _window(row, probe(data, 1)["fps"])
            info = probe(data, settings.min_frames, window, full=settings.full_check and not settings.reencode)
    except BadClip as e:
        return ClipResult(index, key, False, reason=str(e))
    except OSError as e:
        return ClipResult(index, key, False, reason=f"cannot read file: {e.strerror or e}")
    meta = {"source": row.source, "label": row.label, "path": row.path, "container": ext, **info}
    if row.extra:
        meta["extra"] = row.extra
    meta["duration"] = round((info["frame_end"] - info["frame_start"]) / info["fps"], 3) if info["fps"] else None
    return ClipResult(index, key, True, ext=ext, video=data, meta=meta)


def decode_sample_check(data: bytes) -> None:
    """Used by verify: decode a few frames of a stored sample; raises BadClip with the reason."""
    probe(data, 1)


