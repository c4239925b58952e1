"""Decode chosen frames of an in-memory video. Two backends behind one interface: decord and PyAV.

Readers are created inside the loader's worker processes (never shared across a fork), with one
decoding thread each: parallelism comes from workers, as in the authors' setup.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np


class DecodeError(RuntimeError):
    """The sample's video cannot be decoded; the loader skips and counts it."""


class VideoReader(Protocol):
    num_frames: int
    fps: float

    def get(self, indices: list[int]) -> np.ndarray:
        """Frames at `indices` as uint8 (len(indices), H, W, 3)."""
        ...


class DecordReader:
    def __init__(self, data: bytes):
        import decord

        try:
            self._vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
            self.num_frames = len(self._vr)
            self.fps = float(self._vr.get_avg_fps())
        except Exception as e:
            raise DecodeError(f"decord cannot open the video: {e}") from None

    def get(self, indices: list[int]) -> np.ndarray:
        try:
            # get_batch seeks to the keyframe before each needed frame: only those frames are decoded.
            return self._vr.get_batch(indices).asnumpy()
        except Exception as e:
            raise DecodeError(f"decord failed on frames {indices[0]}..{indices[-1]}: {e}") from None


class PyAVReader:
    def __init__(self, data: bytes):
        import av

        self._data = data
        try:
            with av.open(io.BytesIO(data)) as c:
                s = c.streams.video[0]
                self.fps = float(s.average_rate or s.guessed_rate or 25)
                self.num_frames = s.frames or sum(1 for _ in c.demux(s) if _.size)
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend](data)
