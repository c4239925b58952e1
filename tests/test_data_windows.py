"""Windowed manifest rows store only the window plus a margin, and the loader samples only inside the window.

The long sources (300 frames, keyframe every 16) carry their frame number in every frame
(data_tools.synth.read_stamp), so "this stored frame is source frame 123" is read from the pixels,
also after a lossy re-encode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.build import build_shards
from data_tools.clipcheck import ClipSettings, process_clip
from data_tools.manifest import ClipRow, write_manifest
from data_tools.synth import CODECS, codec_available, read_stamp, write_video
from vmae_ds.data import DataConfig
from vmae_ds.data.decode import open_video
from vmae_ds.data.stream import decode_clip

N, FPS, GOP, MARGIN = 300, 25, 16, 8
WINDOW = (4.0, 6.4)  # seconds -> source frames [100, 160), in the middle
S, E = 100, 160
# (codec, B-frames): B-frames make decode order differ from presentation order.
SOURCES = {"h264": ("h264", 2), "h265": ("h265", 3), "vp9": ("vp9", 0), "av1": ("av1", 0)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("long_sources")
    return {name: write_video(root / f"long_{name}{CODECS[codec][1]}", N, (48, 64), FPS, seed=3, gop=GOP,
                              codec=codec, bframes=bframes, stamp=True)
            for name, (codec, bframes) in SOURCES.items() if codec_available(codec)}


def _store(path: Path, row: dict, **settings) -> tuple[bytes, dict]:
    r = process_clip((0, {"path": str(path), **row}, str(path), ClipSettings(**settings)))
    assert r.ok, r.reason
    return r.video, r.meta


def _stamps(frames: np.ndarray) -> list[int]:
    return [read_stamp(f) for f in frames]


@pytest.mark.parametrize("name", list(SOURCES))
def test_copy_mode_stores_only_the_window_and_its_frames_are_bit_identical(sources, name):
    if name not in sources:
        pytest.skip(f"PyAV has no {name} encoder here")
    src_bytes = sources[name].read_bytes()
    video, meta = _store(sources[name], {"start": WINDOW[0], "end": WINDOW[1]})
    assert (meta["source_frame_start"], meta["source_frame_end"], meta["source_num_frames"]) == (S, E, N)
    fs, fe = meta["frame_start"], meta["frame_end"]
    assert fe - fs == E - S and meta["duration"] == 2.4
    # Margin kept, cut at keyframes: at most one GOP more than the margin on each side.
    assert MARGIN <= fs <= MARGIN + GOP and MARGIN <= meta["num_frames"] - fe <= MARGIN + GOP
    assert meta["num_frames"] < N / 2 and len(video) < len(src_bytes) / 2
    stored, source = open_video(video), open_video(src_bytes)
    assert stored.num_frames == meta["num_frames"] and stored.fps == FPS
    window = stored.get(list(range(fs, fe)))
    assert _stamps(window) == list(range(S, E))
    assert np.array_equal(window, source.get(list(range(S, E))))  # no re-encode: the same decoded pixels
    # The PyAV fallback reader indexes the stored clip the same way.
    assert np.array_equal(open_video(video, "pyav").get([fs, fe - 1]), window[[0, -1]])


def test_reencode_mode_encodes_only_the_window_and_margin(sources):
    src_bytes = sources["h264"].read_bytes()
    video, meta = _store(sources["h264"], {"start": WINDOW[0], "end": WINDOW[1]}, reencode=True, short_side=48)
    assert (meta["frame_start"], meta["frame_end"], meta["num_frames"]) == (MARGIN, MARGIN + E - S, E - S + 2 * MARGIN)
    assert (meta["source_frame_start"], meta["source_frame_end"]) == (S, E)
    assert len(video) < len(src_bytes) / 2
    window = open_video(video).get(list(range(meta["frame_start"], meta["frame_end"])))
    assert _stamps(window) == list(range(S, E))
    diff = np.abs(window.astype(np.int16) - open_video(src_bytes).get(list(range(S, E)))).mean()
    assert diff < 10, diff  # lossy, but the same pictures


@pytest.mark.parametrize("reencode", [False, True])
def test_frame_rows_clamp_the_margin_at_both_ends_of_the_source(sources, reencode):
    path = sources["h264"]
    video, meta = _store(path, {"start_frame": 0, "num_frames": 40}, reencode=reencode)  # authors' list row
    assert (meta["frame_start"], meta["frame_end"]) == (0, 40) and meta["source_frame_start"] == 0
    assert meta["num_frames"] < N / 2
    assert _stamps(open_video(video).get([0, 39])) == [0, 39]
    video, meta = _store(path, {"start_frame": 270}, reencode=reencode)  # to the end of the source
    assert (meta["source_frame_start"], meta["source_frame_end"]) == (270, N)
    assert meta["frame_end"] == meta["num_frames"] and meta["frame_end"] - meta["frame_start"] == 30
    assert _stamps(open_video(video).get([meta["frame_start"], meta["frame_end"] - 1])) == [270, N - 1]


def test_window_covering_the_whole_source_keeps_the_original_bytes(sources):
    path = sources["h264"]
    video, meta = _store(path, {"start_frame": 0})
    assert video == path.read_bytes() and (meta["frame_start"], meta["frame_end"]) == (0, N)


@pytest.mark.parametrize("reencode", [False, True])
def test_built_shards_hold_windows_and_the_loader_samples_only_inside_them(sources, tmp_path, reencode):
    path = sources["h264"]
    windows = [(1.0, 2.6), (8.0, 11.0)]  # source frames [25, 65) and [200, 275)
    rows = [ClipRow(path=str(path), source="ava", start=a, end=b) for a, b in windows]
    write_manifest(rows, tmp_path / "m.jsonl")
    summary = build_shards(tmp_path / "m.jsonl", tmp_path / "s", workers=0, progress=False,
                           clip=ClipSettings(reencode=reencode))
    assert (summary.written, summary.skipped) == (2, 0)
    assert summary.bytes < path.stat().st_size  # two rows of one source: less than one copy of it
    cfg = DataConfig(shards=str(tmp_path / "s"), num_frames=8, sampling_rate=4)
    samples = [s for t in sorted((tmp_path / "s").glob("*.tar"))
               for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)]
    for sample in samples:
        meta = json.loads(sample["json"])
        lo, hi = meta["source_frame_start"], meta["source_frame_end"]
        assert (lo, hi) in [(round(a * FPS), round(b * FPS)) for a, b in windows]
        seen = []
        for seed in range(40):
            clip = decode_clip(sample["mp4"], meta, cfg, torch.Generator().manual_seed(seed))
            stamps = [read_stamp(f.numpy()) for f in clip]
            assert all(lo <= t < hi for t in stamps) and np.all(np.diff(stamps) == 4), (lo, hi, stamps)
            seen += stamps
        assert min(seen) < lo + 12 and max(seen) >= hi - 12  # the random starts reach both ends of the window
