"""Decode chosen frames of an in-memory video. Two backends behind one interface: decord and PyAV.

`decord` is the maintained `decord2` fork (same import name; FFmpeg 8 with dav1d, so AV1 as well as
H.264 / H.265 / VP9); `pyav` is the fallback. The shard builder trial-decodes every clip through
`open_video` too, with the backend it records in index.json, so a clip that passed the build cannot
fail in training for a codec reason.

Readers are created inside the loader's worker processes (never shared across a fork), with one
decoding thread each: parallelism comes from workers, as in the authors' setup.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np

# FFmpeg's AVERROR_DECODER_NOT_FOUND (-FFERRTAG(0xF8, 'D', 'E', 'C')): decord prints only this number when
# the container opens but its FFmpeg has no decoder for the stream's codec.
AVERROR_DECODER_NOT_FOUND = -0x434544F8


class DecodeError(RuntimeError):
    """The sample's video cannot be decoded; the loader skips and counts it."""


class UnsupportedCodec(DecodeError):
    """The container is readable but the backend has no decoder for its video codec."""

    def __init__(self, codec: str | None, decoder: str):
        self.codec, self.decoder = codec, decoder
        if codec:
            super().__init__(f"codec {codec} not supported by decoder {decoder}")
        else:  # PyAV names only codecs its FFmpeg can decode
            super().__init__(f"codec not supported by decoder {decoder} (unnamed: PyAV's FFmpeg has no decoder "
                             "for it either)")


class VideoReader(Protocol):
    num_frames: int
    fps: float

    def get(self, indices: list[int]) -> np.ndarray:
        """Frames at `indices` as uint8 (len(indices), H, W, 3)."""
        ...


def stream_codec(data: bytes) -> str | None:
    """Canonical FFmpeg name of the first video stream's codec ('h264', 'av1', ...), via PyAV's FFmpeg.

    None when there is no video stream or that FFmpeg has no decoder for it (then it cannot name it).
    """
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video or c.streams.video[0].codec_context is None:
                return None
            return c.streams.video[0].codec_context.codec.canonical_name
    except (av.FFmpegError, ValueError):
        return None


def decoder_name(backend: str) -> str:
    """The library and version behind a backend, e.g. 'decord 3.4.0' (for reasons and build records)."""
    if backend == "decord":
        import decord

        return f"decord {decord.__version__}"
    if backend == "pyav":
        import av

        return f"PyAV {av.__version__}"
    raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")


# decord feeds the decoder one packet per wanted frame. FFmpeg 8's HEVC decoder can return several frames
# for one packet (at an IDR after B-frames) and then refuses the next packet with EAGAIN, which decord2 3.4
# reports with these words; the same FFmpeg through PyAV decodes such files.
_DECORD_EAGAIN = "Error sending packet"


class DecordReader:
    def __init__(self, data: bytes):
        import decord

        self._data = data
        self._fallback: PyAVReader | None = None
        try:
            self._vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
            self.num_frames = len(self._vr)
            self.fps = float(self._vr.get_avg_fps())
        except Exception as e:
            if str(AVERROR_DECODER_NOT_FOUND) in str(e):
                raise UnsupportedCodec(stream_codec(data), decoder_name("decord")) from None
            raise DecodeError(f"decord cannot open the video: {e}") from None

    def get(self, indices: list[int]) -> np.ndarray:
        if self._fallback is None:
            try:
                # get_batch seeks to the keyframe before each needed frame: only those frames are decoded.
                return self._vr.get_batch(indices).asnumpy()
            except Exception as e:
                if _DECORD_EAGAIN not in str(e):
                    raise DecodeError(f"decord failed on frames {indices[0]}..{indices[-1]}: {e}") from None
                # The decord reader is unusable after this error: PyAV reads this video from now on.
                self._fallback = PyAVReader(self._data)
        return self._fallback.get(indices)


# Codecs whose FFmpeg decoders check `skip_frame` on every packet, so it can be switched between packets:
# non-reference frames nobody asked for are then not decoded at all (no frame references them, so the
# frames that are decoded come out bit-identical to a full decode).
_SKIP_NONREF = {"h264", "hevc"}


class PyAVReader:
    """Frames through PyAV from one opened container.

    The packets are demuxed once (in memory: cheap next to decoding) with their frame numbers and keyframe
    flags, so `get` can start at the keyframe before each wanted frame that the decoder has not reached yet
    (seeking past GOPs no wanted frame is in), skip the non-reference frames no one asked for (H.264 and
    HEVC: `vmae-shards build --reencode` stores non-reference B-frames for this), and stop after the last
    wanted frame. Only the wanted frames are converted to RGB.
    """

    def __init__(self, data: bytes):
        import av

        try:
            self._c = av.open(io.BytesIO(data))
            if not self._c.streams.video:
                raise DecodeError("PyAV: no video stream")
            s = self._stream = self._c.streams.video[0]
            if s.codec_context is None:  # demuxable, but this FFmpeg has no decoder for it
                raise UnsupportedCodec(None, decoder_name("pyav"))
            s.thread_type, s.thread_count = "SLICE", 1
            self.fps = float(s.average_rate or s.guessed_rate or 25)
            self.width, self.height = s.codec_context.width, s.codec_context.height  # of the decoded frames
            self._tb, self._start = s.time_base, s.start_time or 0
            self._packets = [p for p in self._c.demux(s) if p.size]
            self.num_frames = s.frames or len(self._packets)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(f"PyAV cannot open the video: {e}") from None
        if self.num_frames <= 0:
            raise DecodeError("PyAV: no video frames")
        self._skip = s.codec_context.name in _SKIP_NONREF
        # frame number of each packet (None without a timestamp) and the packet positions of the keyframes
        self._frame = [self._index(p.pts) for p in self._packets]
        self._keys = [i for i, p in enumerate(self._packets) if p.is_keyframe and self._frame[i] is not None]
        self._used = False

    def _index(self, pts: int | None) -> int | None:
        return None if pts is None else round(float((pts - self._start) * self._tb) * self.fps)

    def _keyframe_before(self, frame: int) -> int:
        """Packet position of the last keyframe whose frame number is <= `frame` (0 when there is none)."""
        best = 0
        for k in self._keys:
            if self._frame[k] <= frame:
                best = k
        return best

    def get(self, indices: list[int]) -> np.ndarray:
        import av

        wanted = sorted(set(indices))
        need, got, sent = set(wanted), {}, set()
        cc = self._stream.codec_context
        try:
            if self._used:
                cc.flush_buffers()
            self._used = True
            timed = None not in self._frame
            i = self._keyframe_before(wanted[0]) if timed else 0
            while i < len(self._packets) and len(got) < len(need):
                nxt = next((f for f in wanted if f not in sent), None)
                if timed and nxt is not None:
                    key = self._keyframe_before(nxt)
                    if key > i:  # no wanted frame before that keyframe is still to be sent: jump there
                        i = key
                frame_no = self._frame[i]
                if self._skip:
                    cc.skip_frame = "DEFAULT" if frame_no in need else "NONREF"
                if frame_no in need:
                    sent.add(frame_no)
                for frame in cc.decode(self._packets[i]):
                    self._keep(frame, need, got)
                i += 1
            if len(got) < len(need):
                cc.skip_frame = "DEFAULT"
                for frame in cc.decode(None):  # the frames the decoder still holds (B-frame reordering)
                    self._keep(frame, need, got)
        except av.FFmpegError as e:
            raise DecodeError(f"PyAV failed decoding: {e}") from None
        missing = [i for i in wanted if i not in got]
        if missing:
            raise DecodeError(f"PyAV: frames {missing[:4]} not found (stream has {self.num_frames})")
        return np.stack([got[i] for i in indices])

    def _keep(self, frame, need: set[int], got: dict[int, np.ndarray]) -> None:
        idx = self._index(frame.pts)
        if idx in need and idx not in got:
            got[idx] = frame.to_ndarray(format="rgb24")


BACKENDS = {"decord": DecordReader, "pyav": PyAVReader}


def open_video(data: bytes, backend: str = "decord") -> VideoReader:
    """A reader over the video bytes; DecodeError (UnsupportedCodec for a codec it lacks) if it cannot open."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend](data)
