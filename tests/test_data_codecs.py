"""AV1, VP9, H.265 and H.264 clips through `vmae-shards build`, `verify` and the loader, with the same reader.

Clips are written by PyAV's bundled encoders (libsvtav1, libvpx-vp9, libx265, libx264), 48x64, 24 frames,
each frame stamped with its number (data_tools.synth.read_stamp), so decoded frames are checked against
what was encoded, not against another decoder's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_helpers import run_cli

from data_tools.build import BuildError, build_shards
from data_tools.clipcheck import ClipSettings, process_clip
from data_tools.manifest import ClipRow, write_manifest
from data_tools.synth import CODECS, codec_available, read_stamp, write_video
from vmae_ds.data import DataConfig, build_pretrain_loader, default_mask_fn, token_grid
from vmae_ds.data.decode import decoder_name, open_video, stream_codec
from vmae_ds.data.stream import decode_clip

FRAMES = 24
# H.265 with B-frames and a closed GOP every 8 frames: FFmpeg 8's HEVC decoder returns several frames for
# one packet at each IDR, which decord2 3.4 cannot take (the reader then falls back to PyAV).
CLIPS = {"av1": ("av1", 0), "vp9": ("vp9", 0), "h265": ("h265", 3), "h264": ("h264", 2)}
FFMPEG_NAMES = {"av1": "av1", "vp9": "vp9", "h265": "hevc", "h264": "h264"}


def _codecs() -> list[str]:
    return [name for name, (codec, _) in CLIPS.items() if codec_available(codec)]


def write_unknown_codec(h264_clip: Path, out: Path) -> Path:
    """An mp4 whose sample entry says 'evc1' (MPEG-5 EVC): a codec with no decoder in these FFmpeg builds."""
    data = h264_clip.read_bytes()
    at = data.index(b"avc1", data.index(b"stsd"))  # the sample entry, not the 'avc1' brand in ftyp
    out.write_bytes(data[:at] + b"evc1" + data[at + 4:])
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codec_clips")
    paths = {}
    for name in _codecs():
        codec, bframes = CLIPS[name]
        for i in range(2):
            paths[f"{name}_{i}"] = write_video(root / f"{name}_{i}{CODECS[codec][1]}", FRAMES, (48, 64), 25,
                                               seed=10 * i, gop=8, codec=codec, bframes=bframes, stamp=True)
    paths["unknown"] = write_unknown_codec(paths["h264_0"], root / "unknown_codec.mp4")
    return paths


@pytest.fixture(scope="module")
def shards(clips, tmp_path_factory) -> Path:
    """Built once through the CLI, as a user would, with 2 worker processes."""
    root = tmp_path_factory.mktemp("codec_shards")
    rows = [ClipRow(path=str(p), source=name.rsplit("_", 1)[0], label=i) for i, (name, p) in enumerate(clips.items())]
    write_manifest(rows, root / "m.jsonl")
    res = run_cli("build", "--manifest", str(root / "m.jsonl"), "--out", str(root / "shards"), "--workers", "2",
                  "--shard-size", "4", "--min-frames", "16", "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    return root / "shards"


def _samples(folder: Path) -> list[dict]:
    return [s for tar in sorted(folder.glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False,
                                                                              empty_check=False)]


def test_every_codec_is_stored_and_only_the_unknown_one_is_skipped_with_its_reason(clips, shards):
    index = json.loads((shards / "index.json").read_text())
    errors = [json.loads(line) for line in (shards / "errors.jsonl").read_text().splitlines()]
    skipped = {Path(e["path"]).name: e["reason"] for e in errors}
    assert list(skipped) == ["unknown_codec.mp4"], skipped  # e.g. 'codec av1 not supported by decoder decord 0.6.0'
    assert index["total_samples"] == len(clips) - 1 and index["skipped"] == 1
    assert index["settings"]["backend"] == "decord"
    assert json.loads((shards / "build.json").read_text())["backend"] == "decord"
    assert errors[0]["reason"].startswith(f"codec not supported by decoder {decoder_name('decord')}")
    stored = {json.loads(s["json"])["path"]: s for s in _samples(shards)}
    for name, path in clips.items():
        if name == "unknown":
            continue
        meta = json.loads(stored[str(path)]["json"])
        assert (meta["num_frames"], meta["fps"], meta["width"], meta["height"]) == (FRAMES, 25.0, 64, 48), name
        video = stored[str(path)][meta["container"]]
        assert video == path.read_bytes()  # copy mode keeps the original bytes
        assert stream_codec(video) == FFMPEG_NAMES[name.rsplit("_", 1)[0]]


def test_verify_passes_on_every_codec(shards, tmp_path):
    res = run_cli("verify", str(shards), "--decode", "-1", "--quiet", "--plot", str(tmp_path / "v.png"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"decode-checked: {len(_codecs()) * 2}" in res.stdout and "OK" in res.stdout


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_both_backends_decode_every_stored_frame_of_every_codec(shards, backend):
    for sample in _samples(shards):
        meta = json.loads(sample["json"])
        reader = open_video(sample[meta["container"]], backend)
        assert reader.num_frames == FRAMES
        frames = reader.get(list(range(FRAMES)))  # sequential: crosses every keyframe (the HEVC IDR case)
        assert [read_stamp(f) for f in frames] == list(range(FRAMES)), (backend, meta["path"])
        sparse = reader.get([21, 3, 13])  # seeks, out of order
        assert [read_stamp(f) for f in sparse] == [21, 3, 13], (backend, meta["path"])


def test_loader_reads_batches_of_every_codec_without_corrupt_samples(shards):
    cfg = DataConfig(shards=str(shards), num_frames=4, sampling_rate=2, input_size=32, num_sample=2,
                     num_workers=2, resampled=False)
    loader = build_pretrain_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                   mask_fn=default_mask_fn(token_grid(cfg, patch=8)))
    try:
        it = iter(loader)
        batches = [next(it) for _ in range(3)]
        corrupt = loader.stats()["corrupt_samples"]
    finally:
        loader.close()
    assert all(b["video"].shape == (4, 3, 4, 32, 32) and b["video"].dtype == torch.uint8 for b in batches)
    assert corrupt == 0
    # Every sample of every codec through the loader's decode path, not only those the batches drew.
    gen = torch.Generator().manual_seed(0)
    for sample in _samples(shards):
        meta = json.loads(sample["json"])
        clip = decode_clip(sample[meta["container"]], meta, cfg, gen)
        stamps = [read_stamp(f.numpy()) for f in clip]
        assert clip.shape == (4, 3, 48, 64) and np.all(np.diff(stamps) == 2), (meta["path"], stamps)


def test_unsupported_codec_gets_its_true_reason_from_both_backends(clips):
    path = clips["unknown"]
    assert stream_codec(path.read_bytes()) is None  # no decoder, so FFmpeg cannot name it
    for backend in ("decord", "pyav"):
        r = process_clip((0, {"path": str(path)}, str(path), ClipSettings(backend=backend)))
        assert not r.ok and r.reason.startswith(f"codec not supported by decoder {decoder_name(backend)}")
        assert "damaged" not in r.reason


def test_build_records_its_backend_and_refuses_another_into_the_same_folder(clips, tmp_path):
    rows = [ClipRow(path=str(p), source="x") for name, p in clips.items() if name.endswith("_0")]
    write_manifest(rows, tmp_path / "m.jsonl")
    summary = build_shards(tmp_path / "m.jsonl", tmp_path / "s", workers=0, progress=False,
                           clip=ClipSettings(backend="pyav"))
    assert (summary.written, summary.skipped) == (len(rows), 0)
    assert json.loads((tmp_path / "s" / "index.json").read_text())["settings"]["backend"] == "pyav"
    with pytest.raises(BuildError, match="backend"):
        build_shards(tmp_path / "m.jsonl", tmp_path / "s", workers=0, progress=False, clip=ClipSettings())
    with pytest.raises(ValueError, match="backend must be one of"):
        ClipSettings(backend="ffmpeg")
