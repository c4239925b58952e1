"""The fast CPU path gives the frames the slow one gave: PyAV's reader (one open, per-GOP seeks, non-reference
frames skipped) against a plain decode of every frame, `--reencode` with non-reference B-frames, and the loader's
batches with either backend on such shards.

Clips are stamped with their frame numbers (data_tools.synth), so "the right frame" is checked against what was
encoded, and "the same frame" against a full sequential decode with nothing skipped (bit for bit).
"""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch
from data_helpers import reader_positions, run_cli

from data_tools.clipcheck import reencode
from data_tools.manifest import ClipRow, write_manifest
from data_tools.synth import read_stamp, write_video
from vmae_ds.data import DataConfig, build_pretrain_loader, default_mask_fn, token_grid
from vmae_ds.data.decode import PyAVReader, open_video

FRAMES = 60


def full_decode(data: bytes) -> np.ndarray:
    """Every frame, in order, nothing skipped, no seek: what any reader must reproduce."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def pict_types(data: bytes) -> str:
    with av.open(io.BytesIO(data)) as c:
        return "".join(" IPB"[int(f.pict_type)] for f in c.decode(c.streams.video[0]))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    """Stamped 48x64 H.264 / H.265 sources (B-frames, GOP 8), and their --reencode copies with and without
    non-reference B-frames (keyframe every 16)."""
    root = tmp_path_factory.mktemp("fast_decode")
    out = {}
    for codec, bf in (("h264", 2), ("h265", 3)):
        path = write_video(root / f"{codec}.mp4", FRAMES, (48, 64), 25, seed=3, gop=8, codec=codec, bframes=bf,
                           stamp=True)
        out[codec] = path.read_bytes()
    out["re_b3"] = reencode(out["h264"], 48, 16, 18, bframes=3)[0]
    out["re_b0"] = reencode(out["h264"], 48, 16, 18, bframes=0)[0]
    return out


def test_reencode_stores_non_reference_b_frames_and_every_frame_in_order(clips):
    types = pict_types(clips["re_b3"])
    assert types.startswith("IBBBP") and [i for i, t in enumerate(types) if t == "I"] == [0, 16, 32, 48], types
    assert set(pict_types(clips["re_b0"])) == {"I", "P"}  # --bframes 0: the old layout
    assert len(clips["re_b3"]) < len(clips["re_b0"])  # B-frames also make the files smaller
    for name in ("re_b3", "re_b0"):
        assert [read_stamp(f) for f in full_decode(clips[name])] == list(range(FRAMES)), name


@pytest.mark.parametrize("name", ["re_b3", "re_b0", "h264", "h265"])
def test_pyav_reader_gives_the_frames_of_a_full_decode_for_any_draw(clips, name):
    data = clips[name]
    full = full_decode(data)
    reader = PyAVReader(data)
    assert reader.num_frames == FRAMES and (reader.height, reader.width) == full.shape[1:3]
    gen = np.random.default_rng(0)
    draws = [list(range(0, FRAMES, 4))[:15],  # the training stride
             [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33],  # stride 2 (SSv2), odd: B-frames
             [2, 17, 33, 49],  # sparse (segments): one frame per GOP, seeks past whole GOPs
             [59, 0, 31, 31, 30],  # out of order, repeated, both ends
             sorted(gen.choice(FRAMES, 16, replace=False).tolist())]
    for idx in draws:  # one reader, several gets: each starts from a flushed decoder
        got = reader.get(idx)
        assert np.array_equal(got, full[idx]), (name, idx)
        assert [read_stamp(f) for f in got] == idx, (name, idx)
    assert np.array_equal(open_video(data, "decord").get(draws[0]), full[draws[0]])  # and decord agrees


def test_skipping_decodes_fewer_frames_than_the_span(clips):
    """On the B-frame layout the reader decodes the P-frames and the wanted B-frames only."""
    from benchmarks.loader_breakdown import _pyav_split

    idx = list(range(5, 5 + 16 * 3, 3))  # 16 frames, stride 3: mostly B-frames
    b3, b0 = _pyav_split(clips["re_b3"], idx), _pyav_split(clips["re_b0"], idx)
    span = idx[-1] + 1  # from the keyframe at 0
    assert b0["frames_decoded"] >= span - 3  # every frame a reference: all decoded (bar a GOP's tail it jumps)
    assert b3["frames_decoded"] < 0.75 * b0["frames_decoded"], (b3, b0)


@pytest.fixture(scope="module")
def bframe_shards(clips, tmp_path_factory):
    """Shards built through the CLI with --reencode (B-frames, the default) from stamped sources."""
    root = tmp_path_factory.mktemp("bframe_shards")
    rows = []
    for i in range(6):
        p = write_video(root / f"v{i}.mp4", FRAMES, (48, 64), 25, seed=i, gop=8, bframes=2, stamp=True)
        rows.append(ClipRow(path=str(p), source="ssv2" if i % 2 else "k710", label=i % 3))
    write_manifest(rows, root / "m.jsonl")
    res = run_cli("build", "--manifest", str(root / "m.jsonl"), "--out", str(root / "s"), "--workers", "2",
                  "--shard-size", "3", "--reencode", "--short-side", "48", "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    settings = json.loads((root / "s" / "build.json").read_text())
    assert settings["bframes"] == 3 and settings["keyint"] == 16
    return root / "s"


def test_loader_batches_positions_and_resume_are_the_same_with_either_backend(bframe_shards):
    cfg = DataConfig(shards=str(bframe_shards), num_frames=8, sampling_rate=3, input_size=32, num_sample=2,
                     num_workers=2, resampled=False)
    runs = {}
    for backend in ("decord", "pyav"):
        mine = cfg.model_copy(update={"backend": backend})
        loader = build_pretrain_loader(mine, batch_size=4, rank=0, world_size=1, seed=5,
                                       mask_fn=default_mask_fn(token_grid(mine, patch=8, tubelet=2)))
        it = iter(loader)
        first = [next(it) for _ in range(2)]
        state = loader.state_dict()
        rest = list(it)
        loader.close()
        runs[backend] = (first, state, rest, loader.stats()["corrupt_samples"])
    (f0, s0, r0, c0), (f1, s1, r1, c1) = runs["decord"], runs["pyav"]
    assert c0 == c1 == 0 and len(f0 + r0) == 3  # 6 clips / 2 per batch: one exact epoch
    for a, b in zip(f0 + r0, f1 + r1, strict=True):
        assert torch.equal(a["video"], b["video"]) and a["keys"] == b["keys"]
        assert torch.equal(a["encoder_mask"], b["encoder_mask"])
    assert reader_positions(s0) == reader_positions(s1)
    resumed = build_pretrain_loader(cfg.model_copy(update={"backend": "pyav"}), batch_size=4, rank=0,
                                    world_size=1, seed=5, mask_fn=default_mask_fn(token_grid(cfg, patch=8)))
    resumed.load_state_dict(s0)  # a decord run continued by pyav
    again = list(resumed)
    resumed.close()
    assert len(again) == len(r0) and all(torch.equal(a["video"], b["video"]) for a, b in zip(again, r0))
