"""Per-clip work of the shard builder: read, trial-decode, cut windows, optionally re-encode. Runs in workers.

The trial decode goes through the loader's own reader (`vmae_ds.data.decode.open_video`) with the backend
the build records, so a stored clip decodes in training exactly as it did here.

Windowed rows (`start`/`end` seconds, or `start_frame`/`num_frames`) store only the window plus
`window_margin` frames each side: copy mode remuxes the packets from the keyframe at or before the margin
start to the first keyframe after the margin end (no re-encode; the cut is checked by decoding the
window's first and last frame from both files), `--reencode` decodes and encodes only that range.
The sample json's `frame_start`/`frame_end` index the stored clip; `source_frame_start`,
`source_frame_end` and `source_num_frames` say where the window lies in the source (`path`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from data_tools.manifest import VIDEO_EXTS, ClipRow

if TYPE_CHECKING:
    from vmae_ds.data.decode import VideoReader

VIDEO_EXT_NAMES = {e.lstrip(".") for e in VIDEO_EXTS}


@dataclass(frozen=True)
class ClipSettings:
    reencode: bool = False
    short_side: int = 320
    keyint: int = 16
    crf: int = 23
    bframes: int = 3  # re-encode: non-reference B-frames between P-frames (the loader does not decode unwanted ones)
    min_frames: int = 16
    full_check: bool = False  # decode every frame of the window, not only its first, middle and last
    backend: str = "decord"  # the loader's decoder (DataConfig.backend): the trial decode uses it
    window_margin: int = 8  # windowed rows: frames kept each side of the window (clamped to the source)

    def __post_init__(self) -> None:
        from vmae_ds.data.decode import BACKENDS  # here: the package pulls in torch, `manifest` never needs it

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.window_margin < 0:
            raise ValueError(f"window_margin must be >= 0, got {self.window_margin}")
        if not 0 <= self.bframes <= 16:
            raise ValueError(f"bframes must be in [0, 16], got {self.bframes}")


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


def open_reader(data: bytes, backend: str) -> VideoReader:
    """The loader's reader over `data`, or BadClip with the true reason (unsupported codec, damage, ...)."""
    from vmae_ds.data.decode import DecodeError, UnsupportedCodec, open_video

    try:
        return open_video(data, backend)
    except UnsupportedCodec as e:
        raise BadClip(str(e)) from None
    except DecodeError as e:
        reason = _pyav_reason(data)
        if reason is None:  # FFmpeg opens it and decodes its start: the rest is missing or broken
            raise BadClip(f"damaged or truncated video ({_first_line(e)})") from None
        raise BadClip(f"not a decodable video: {reason}") from None


def probe(data: bytes, min_frames: int, window: tuple[int, int | None] = (0, None), full: bool = False,
          backend: str = "decord") -> dict:
    """Open with the loader's reader and decode the first, middle and last frame of the window.

    Reading the last frame catches truncated files whose index is intact; an unreadable index fails
    at open. Returns fps, frame count, width, height and the usable frame window.
    """
    reader = open_reader(data, backend)
    n = reader.num_frames
    if n <= 0:
        raise BadClip("no video frames")
    start = max(0, window[0])
    end = n if window[1] is None else min(n, window[1])
    if end - start < min_frames:
        raise BadClip(f"too short: {end - start} frames in window [{start}, {end}) < --min-frames {min_frames}")
    wanted = sorted({start, (start + end) // 2, end - 1})
    try:
        frames = reader.get(wanted)
        for a in range(start, end, 32) if full else ():  # in chunks: a long clip needs no GBs of RAM
            wanted = list(range(a, min(a + 32, end)))
            reader.get(wanted)
    except Exception:
        # The index opened but the frames are not all there: typically a file cut short.
        raise BadClip(f"damaged or truncated video: frames {wanted} of {n} not all decodable") from None
    h, w = frames.shape[1:3]
    return {"fps": float(reader.fps), "num_frames": n, "width": int(w), "height": int(h),
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


def reencode(data: bytes, short_side: int, keyint: int, crf: int,
             frames: tuple[int, int] | None = None, bframes: int = 0) -> tuple[bytes, list[int]]:
    """H.264 (PyAV's bundled FFmpeg), short side scaled down to `short_side`, keyframe every `keyint`.

    `bframes` > 0: that many B-frames between P-frames, in a fixed pattern, none of them a reference
    (no B-pyramid), keyframes exactly every `keyint` (no scene-cut keyframes): a reader can skip every B-frame
    it does not want without changing any other frame.
    The source's frame types are not carried over (x264 would otherwise follow them).

    `frames` = (a, b): only the source frames [a, b) are decoded (after a seek) and encoded. Returns the
    new bytes and the source index of every stored frame. Every frame stored is decoded here, so this is
    also a full trial decode of it. Single-threaded x264 keeps the output byte-identical between runs
    (resume determinism); parallelism comes from processes.
    """
    out = io.BytesIO()
    kept: list[int] = []
    try:
        with av.open(io.BytesIO(data)) as src:
            vin = src.streams.video[0]
            rate = vin.average_rate or vin.guessed_rate or Fraction(25)
            with av.open(out, mode="w", format="mp4") as dst:
                vout = None
                for idx, frame in _decoded_range(src, vin, float(rate), frames):
                    if vout is None:
                        w, h = frame.width, frame.height
                        scale = min(1.0, short_side / min(w, h))
                        tw, th = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
                        vout = dst.add_stream("libx264", rate=rate)
                        vout.width, vout.height, vout.pix_fmt = tw, th, "yuv420p"
                        vout.options = {"g": str(keyint), "crf": str(crf), "preset": "veryfast",
                                        "threads": "1", "bf": str(bframes),
                                        "x264-params": "b-pyramid=none:b-adapt=0:scenecut=0"}
                    img = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
                    img.pict_type = av.video.frame.PictureType.NONE  # x264 picks I/P/B, not the source
                    img.pts, img.time_base = len(kept), Fraction(1) / Fraction(rate)
                    dst.mux(vout.encode(img))
                    kept.append(idx)
                if vout is None:
                    raise BadClip("no video frames" if frames is None else f"no video frames in [{frames[0]}, "
                                  f"{frames[1]}) (re-encode)")
                dst.mux(vout.encode())
    except BadClip:
        raise
    except Exception as e:
        raise BadClip(f"not a decodable video (re-encode): {_first_line(e)}") from None
    return out.getvalue(), kept


def _decoded_range(src: av.container.InputContainer, vin: av.video.stream.VideoStream, fps: float,
                   frames: tuple[int, int] | None) -> Iterator[tuple[int, av.VideoFrame]]:
    """(source frame index, frame) for every frame, or for [a, b) only: seek to the keyframe before a.

    Indices come from the presentation time, as in the loader's PyAV reader (constant frame rate).
    """
    if frames is None:
        yield from enumerate(src.decode(vin))
        return
    a, b = frames
    tb, t0 = vin.time_base, vin.start_time or 0
    if a > 0:
        src.seek(int(t0 + a / fps / tb), stream=vin, backward=True, any_frame=False)
    for frame in src.decode(vin):
        if frame.pts is None:
            raise BadClip("frames without timestamps: cannot cut a window (re-encode)")
        idx = round(float((frame.pts - t0) * tb) * fps)
        if idx >= b:
            return
        if idx >= a:
            yield idx, frame


def _container_for(src_format: str, ext: str) -> list[tuple[str, str]]:
    """(muxer, member extension) to try for a stream copy: the source's own family first, Matroska last."""
    if "mp4" in src_format.split(","):
        return [("mp4", "mp4"), ("matroska", "mkv")]
    if ext == "webm":
        return [("webm", "webm"), ("matroska", "mkv")]
    return [("matroska", "mkv")]


@dataclass
class Cut:
    """A stream-copied window: the new bytes, their member extension, and which source frames they hold."""

    video: bytes
    ext: str
    first: int  # source index of the stored clip's frame 0
    frames: int  # frames stored (source frames first .. first + frames - 1)


def cut_copy(data: bytes, ext: str, a: int, b: int, num_frames: int) -> Cut | None:
    """Stream-copy source frames [a, b) (presentation order) without re-encoding.

    Keeps the packets, in decode order, from the last keyframe at or before frame a up to the first
    keyframe at or after frame b that leaves no frame before it missing; leading pictures of the first
    keyframe (shown before it, decodable only from earlier packets: open GOPs) are dropped. None when the
    cut would keep the whole source or the stream cannot be cut safely (timestamps missing, packet count
    differs from the reader's frame count): the caller then stores the source as it is.
    """
    try:
        with av.open(io.BytesIO(data)) as src:
            vin = src.streams.video[0]
            packets = [(p.pts, p.dts, p.is_keyframe) for p in src.demux(vin) if p.size]
            src_format = src.format.name
    except (av.FFmpegError, IndexError):
        return None
    if len(packets) != num_frames or any(pts is None for pts, _, _ in packets):
        return None
    rank = np.empty(len(packets), np.int64)  # presentation index of each packet (they are in decode order)
    rank[np.argsort([pts for pts, _, _ in packets], kind="stable")] = np.arange(len(packets))
    keys = [i for i, (_, _, key) in enumerate(packets) if key]
    if not keys or rank[keys[0]] > a:
        return None
    first = max(i for i in keys if rank[i] <= a)
    kept = _packets_to_keep(packets, rank, first, b)
    if len(kept) == len(packets):
        return None
    # New times: presentation from zero; decode times packed (the j-th kept packet takes the j-th decode
    # slot from `first`), so dropped leading pictures leave no hole that would lower the frame rate.
    t0 = packets[first][0]
    times = {i: (packets[i][0] - t0, None if packets[first + j][1] is None else packets[first + j][1] - t0)
             for j, i in enumerate(kept)}
    for fmt, out_ext in _container_for(src_format, ext):
        try:
            return Cut(_remux(data, times, fmt), out_ext, int(rank[first]), len(kept))
        except (av.FFmpegError, ValueError):
            continue  # this muxer does not take the codec: try the next
    return None


def _packets_to_keep(packets: list[tuple], rank: np.ndarray, first: int, b: int) -> list[int]:
    """Decode-order indices to keep: from `first` up to a keyframe past frame b with no frame missing before it."""
    start_pts = packets[first][0]
    kept: list[int] = []
    lo, hi = int(rank[first]), -1
    for i in range(first, len(packets)):
        pts, _, key = packets[i]
        if i > first and key and rank[i] >= b and hi >= b - 1 and hi - lo + 1 == len(kept):
            break
        if pts < start_pts:
            continue  # a leading picture of the first keyframe: its references are not stored
        kept.append(i)
        hi = max(hi, int(rank[i]))
    return kept


def _remux(data: bytes, times: dict[int, tuple[int, int | None]], fmt: str) -> bytes:
    """The video packets at decode-order positions `times` (-> new pts, dts) in a new container."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as src:
        vin = src.streams.video[0]
        with av.open(out, mode="w", format=fmt) as dst:
            # opaque: reuse the decoder's parameters; a new codec object would need an encoder of the
            # decoder's name, and there is none for AV1's libdav1d.
            vout = dst.add_stream_from_template(vin, opaque=True)
            i = -1
            for p in src.demux(vin):
                if not p.size:
                    continue
                i += 1
                if i in times:
                    p.pts, p.dts = times[i]
                    p.stream = vout
                    dst.mux(p)
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


def _is_windowed(row: ClipRow) -> bool:
    return row.start is not None or row.end is not None or row.start_frame is not None


def store_window(data: bytes, ext: str, row: ClipRow, settings: ClipSettings) -> tuple[bytes, str, dict]:
    """A windowed row -> (bytes to store, member extension, probe info indexing the stored clip).

    Only the window plus `settings.window_margin` frames each side is stored (see the module docstring).
    """
    src = open_reader(data, settings.backend)
    n = src.num_frames
    s, e = _window(row, src.fps)  # a window in seconds needs the fps, hence the open reader first
    s, e = max(0, s), n if e is None else min(n, e)
    if e - s < settings.min_frames:
        raise BadClip(f"too short: {e - s} frames in window [{s}, {e}) < --min-frames {settings.min_frames}")
    a, b = max(0, s - settings.window_margin), min(n, e + settings.window_margin)
    first = 0  # source index of the stored clip's frame 0
    full = settings.full_check and not settings.reencode  # re-encoding decodes every stored frame anyway
    if settings.reencode:
        data, kept = reencode(data, settings.short_side, settings.keyint, settings.crf,
                              None if (a, b) == (0, n) else (a, b), settings.bframes)
        ext = "mp4"
        # Counted, not subtracted: a stream that skips a timestamp has no frame to hold the place.
        fs, fe = sum(i < s for i in kept), sum(i < e for i in kept)
    else:
        cut = cut_copy(data, ext, a, b, n)
        if cut is not None and _same_frames(src, cut, s, e, settings.backend):
            data, ext, first = cut.video, cut.ext, cut.first
        fs, fe = s - first, e - first
    info = probe(data, settings.min_frames, (fs, fe), full=full, backend=settings.backend)
    return data, ext, info | {"source_frame_start": s, "source_frame_end": e, "source_num_frames": n}


def _same_frames(src: VideoReader, cut: Cut, s: int, e: int, backend: str) -> bool:
    """The cut decodes to the source's pixels at the window's first and last frame (same decoder, same packets).

    False sends the caller back to storing the whole source: larger, but right.
    """
    try:
        stored = open_reader(cut.video, backend)
        if stored.num_frames != cut.frames or abs(stored.fps - src.fps) > 1e-3 * src.fps:
            return False
        return bool(np.array_equal(src.get([s, e - 1]), stored.get([s - cut.first, e - 1 - cut.first])))
    except Exception:  # any decode problem of the cut: keep the source, whose own check follows
        return False


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
        if _is_windowed(row):
            data, ext, info = store_window(data, ext, row, settings)
        else:
            if settings.reencode:
                data, ext = reencode(data, settings.short_side, settings.keyint, settings.crf,
                                     bframes=settings.bframes)[0], "mp4"
            info = probe(data, settings.min_frames, full=settings.full_check and not settings.reencode,
                         backend=settings.backend)
    except BadClip as e:
        return ClipResult(index, key, False, reason=str(e))
    except OSError as e:
        return ClipResult(index, key, False, reason=f"cannot read file: {e.strerror or e}")
    meta = {"source": row.source, "label": row.label, "path": row.path, "container": ext, **info}
    if row.extra:
        meta["extra"] = row.extra
    meta["duration"] = round((info["frame_end"] - info["frame_start"]) / info["fps"], 3) if info["fps"] else None
    return ClipResult(index, key, True, ext=ext, video=data, meta=meta)


def decode_sample_check(data: bytes, backend: str = "decord") -> None:
    """Used by verify: decode a few frames of a stored sample with `backend`; raises BadClip with the reason."""
    probe(data, 1, backend=backend)
