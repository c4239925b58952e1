"""Shard builder, verify and stats on real H.264 clips and bad files of every kind."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import tarfile
from dataclasses import replace

import pytest
from data_helpers import BAD_REASONS, build, copy_tree, make_corpus, run_cli, sample_keys, shared_dir

from data_tools import workpool
from data_tools.build import CRASH_ENV, BuildError, build_shards
from data_tools.clipcheck import ClipSettings, process_clip, sample_key
from data_tools.inspect_shards import SAFE_KEY, inspect
from data_tools.manifest import ClipRow, write_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(shared_dir(tmp_path_factory, "data_corpus"))


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    return build(corpus, shared_dir(tmp_path_factory, "data_shards", create=False))


def test_counts_reconcile_and_every_bad_file_is_reported(corpus, shards):
    index = json.loads((shards / "index.json").read_text())
    errors = [json.loads(line) for line in (shards / "errors.jsonl").read_text().splitlines()]
    assert index["total_samples"] == len(corpus.good)
    assert index["skipped"] == len(errors) == len(BAD_REASONS)
    assert index["total_samples"] + index["skipped"] == index["manifest_rows"] == corpus.rows
    by_name = {os.path.basename(e["path"]): e["reason"] for e in errors}
    for name, reason in BAD_REASONS.items():
        assert by_name[name].startswith(reason), (name, by_name[name])
    assert index["per_source"] == {"k710": 10, "ssv2": 6}
    assert sum(s["samples"] for s in index["shards"]) == index["total_samples"]
    assert all(s["bytes"] == (shards / s["file"]).stat().st_size for s in index["shards"])
    assert index["settings"]["shard_size"] == 5


def test_shards_hold_safe_unique_keys_with_video_and_json(corpus, shards):
    keys = sample_keys(shards)
    assert len(keys) == len(corpus.good)
    assert all(SAFE_KEY.match(k) and "." not in k for k in keys)
    names = [m.name for t in sorted(shards.glob("*.tar")) for m in tarfile.open(t).getmembers()]
    assert sorted(n.split(".", 1)[1] for n in names) == sorted(["json", "mp4"] * len(keys))
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as t:
        meta = json.loads(t.extractfile([m for m in t.getmembers() if m.name.endswith(".json")][0]).read())
    assert {"source", "label", "fps", "num_frames", "width", "height", "path"} <= set(meta)
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (64, 48, 30, 25.0)
    assert not list(shards.glob("*.tmp"))


def test_sample_keys_are_safe_for_awkward_names():
    key = sample_key(12, "/data/a.b c/clip.v2 (final)!.mp4")
    assert SAFE_KEY.match(key) and key.startswith("000000012_")
    assert sample_key(1, "x/../y.mp4") != sample_key(2, "x/../y.mp4")


def test_killed_build_resumes_to_the_same_samples(corpus, shards, tmp_path):
    out = tmp_path / "resumed"
    args = ["build", "--manifest", str(corpus.manifest), "--out", str(out), "--shard-size", "5",
            "--workers", "2", "--quiet"]
    killed = run_cli(*args, env={**os.environ, CRASH_ENV: "1"})
    assert killed.returncode == -9, killed.stderr  # SIGKILL half-way through the second shard
    assert len(list(out.glob("shard-*.tar"))) == 1 and list(out.glob("*.tar.tmp"))
    assert not (out / "index.json").exists()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 1 of" in resumed.stdout
    assert "written 16 + skipped 7 = 23" in resumed.stdout
    assert sample_keys(out) == sample_keys(shards)  # same keys, same bytes: none twice, none missing
    assert not list(out.glob("*.tmp"))
    again = run_cli(*args)  # a finished build is left alone
    assert again.returncode == 0 and f"resuming: {len(list(out.glob('shard-*.tar')))} of" in again.stdout


def test_rebuilding_with_other_settings_is_refused(corpus, shards):
    with pytest.raises(BuildError, match="shard_size"):
        build_shards(corpus.manifest, shards, shard_size=7, progress=False)


def test_verify_passes_and_stats_plots(shards, tmp_path):
    ok = run_cli("verify", str(shards), "--quiet", "--plot", str(tmp_path / "v.png"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout and "k710" in ok.stdout and "64x48" in ok.stdout
    stats = run_cli("stats", str(shards), "--quiet", "--plot", str(tmp_path / "s.png"))
    assert stats.returncode == 0 and "duration (s):" in stats.stdout
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_fails_on_damaged_shards(shards, tmp_path):
    bad = copy_tree(shards, tmp_path / "damaged")
    first = sorted(bad.glob("shard-*.tar"))[0]
    first.write_bytes(first.read_bytes()[:1500])  # truncated in the middle of a member
    (bad / "shard-000009.tar").write_bytes(b"garbage")  # not in the index, not a tar
    second = sorted(bad.glob("shard-*.tar"))[1]
    (bad / "shard-000010.tar").write_bytes(second.read_bytes())  # the same keys twice
    report = inspect(bad, progress=False, workers=2)
    assert not report.ok
    text = "\n".join(report.damaged)
    assert first.name in text and "shard-000009.tar" in text
    assert "shard-000010.tar: key '" in text and f"also in {second.name}" in text
    res = run_cli("verify", str(bad), "--quiet")
    assert res.returncode == 1 and f"DAMAGED {first.name}" in res.stdout


def test_reencode_scales_short_side_and_keeps_frames(corpus, tmp_path):
    out = build(corpus, tmp_path / "re", clip=ClipSettings(reencode=True, short_side=32), workers=1)
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == len(corpus.good) and index["settings"]["reencode"] is True
    report = inspect(out, decode_per_shard=-1, progress=False)
    assert report.ok, report.damaged
    assert set(report.resolutions) == {"42x32"}  # 64x48 with the short side at 32, even sizes


def test_cli_manifest_from_folder_and_bad_manifest_line(corpus, tmp_path):
    res = run_cli("manifest", str(corpus.root / "ssv2"), "--out", str(tmp_path / "m.jsonl"), "--source", "ssv2")
    assert res.returncode == 0 and "6 clips" in res.stdout
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["source"] for r in rows} == {"ssv2"}
    (tmp_path / "bad.csv").write_text("path,fps\na.mp4,25\nb.mp4,fast\n")
    res = run_cli("build", "--manifest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "bad.csv:3: field 'fps' has a bad value 'fast'" in res.stderr


def test_hybrid_manifest_builds_shards_that_mix_every_source(corpus, tmp_path):
    (tmp_path / "good.txt").write_text("".join(f"{p} 0 -1\n" for p in corpus.good))  # authors' list format
    sources = [a for name in ("k710", "ssv2", "webvid") for a in ("--source", f"{name}={tmp_path / 'good.txt'}")]
    res = run_cli("hybrid", *sources, "--total", "30", "--out", str(tmp_path / "h.jsonl"))
    assert res.returncode == 0, res.stderr
    out = build(replace(corpus, manifest=tmp_path / "h.jsonl"), tmp_path / "hy", shard_size=10)
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == 30 and index["skipped"] == 0
    for shard in index["shards"]:
        assert set(shard["sources"]) == {"k710", "ssv2", "webvid"}, shard


def _segfault_on_crash_files(task):
    """A decoder crash, reproduced: the worker dies of SIGSEGV on files named crash*.mp4."""
    if os.path.basename(task[2]).startswith("crash"):
        faulthandler.disable()  # pytest's crash dump would only clutter the output
        os.kill(os.getpid(), signal.SIGSEGV)
    return process_clip(task)


def test_a_clip_that_crashes_its_worker_is_skipped_with_the_reason(corpus, tmp_path, monkeypatch):
    crash = tmp_path / "crash.mp4"
    crash.write_bytes(corpus.good[0].read_bytes())
    rows = [ClipRow(path=str(p), source="k710") for p in corpus.good[:6]]
    rows.insert(3, ClipRow(path=str(crash), source="k710"))
    write_manifest(rows, tmp_path / "m.jsonl")
    monkeypatch.setattr(workpool, "process_clip", _segfault_on_crash_files)
    summary = build_shards(tmp_path / "m.jsonl", tmp_path / "out", shard_size=4, workers=2, progress=False)
    assert (summary.written, summary.skipped) == (6, 1)
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"row": 3, "key": "000000003_crash", "path": str(crash), "source": "k710",
                       "reason": workpool.CRASH_REASON}]


def test_manifest_windows_become_frame_windows(corpus):
    path = str(corpus.good[0])  # 30 frames at 25 fps
    ok = process_clip((0, {"path": path, "start_frame": 10, "num_frames": 20}, path, ClipSettings()))
    assert ok.ok and (ok.meta["frame_start"], ok.meta["frame_end"], ok.meta["duration"]) == (10, 30, 0.8)
    short = process_clip((1, {"path": path, "start": 0.2, "end": 0.6}, path, ClipSettings()))
    assert not short.ok and short.reason == "too short: 10 frames in window [5, 15) < --min-frames 16"


def test_full_check_decodes_every_frame_of_good_clips_and_rejects_bad_ones(corpus):
    full = ClipSettings(full_check=True)
    good = [process_clip((i, {"path": str(p)}, str(p), full)) for i, p in enumerate(corpus.good[:3])]
    assert all(r.ok and r.meta["num_frames"] == 30 for r in good)
    cut = corpus.bad["cut_faststart.mp4"]
    assert not process_clip((9, {"path": str(cut)}, str(cut), full)).ok
