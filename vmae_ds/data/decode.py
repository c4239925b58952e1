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


class PyAVReader:
    def __init__(self, data: bytes):
        import av

        self._data = data
        try:
            with av.open(io.BytesIO(data)) as c:
                if not c.streams.video:
                    raise DecodeError("PyAV: no video stream")
                s = c.streams.video[0]
                if s.codec_context is None:  # demuxable, but this FFmpeg has no decoder for it
                    raise UnsupportedCodec(None, decoder_name("pyav"))
                self.fps = float(s.average_rate or s.guessed_rate or 25)
                self.num_frames = s.frames or sum(1 for _ in c.demux(s) if _.size)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(f"PyAV cannot open the video: {e}") from None
        if self.num_frames <= 0:
            raise DecodeError("PyAV: no video frames")

    def get(self, indices: list[int]) -> np.ndarray:
        import av

        wanted = sorted(set(indices))
        got: dict[int, np.ndarray] = {}
        try:
            with av.open(io.BytesIO(self._data)) as c:
                s = c.streams.video[0]
                s.thread_type, s.thread_count = "SLICE", 1
                # Frame index from the presentation time; seek to the keyframe before the first needed one.
                tb, start = s.time_base, s.start_time or 0
                first = wanted[0]
                if first > 0:
                    c.seek(int(start + first / self.fps / tb), stream=s, backward=True, any_frame=False)
                for frame in c.decode(s):
                    idx = round(float((frame.pts - start) * tb) * self.fps) if frame.pts is not None else None
                    if idx is None:
                        continue
                    if idx in wanted and idx not in got:
                        got[idx] = frame.to_ndarray(format="rgb24")
                    if idx >= wanted[-1]:
                        break
        except av.FFmpegError as e:
            raise DecodeError(f"PyAV failed decoding: {e}") from None
        missing = [i for i in wanted if i not in got]
        if missing:
            raise DecodeError(f"PyAV: frames {missing[:4]} not found (stream has {self.num_frames})")
        return np.stack([got[i] for i in indices])


BACKENDS = {"decord": DecordReader, "pyav": PyAVReader}


def open_video(data: bytes, backend: str = "decord") -> VideoReader:
    """A reader over the video bytes; DecodeError (UnsupportedCodec for a codec it lacks) if it cannot open."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend](data)
