"""Manifest formats, folder scans and the hybrid mix."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from data_helpers import run_cli

from data_tools.hybrid import PAPER_WEIGHTS, compose, plan_mix
from data_tools.manifest import ClipRow, ManifestError, read_manifest, scan_folder, write_manifest


def test_csv_tsv_jsonl_and_plain_lists(tmp_path):
    (tmp_path / "a.csv").write_text("video,label,time_start,time_end,youtube_id\nx/a.mp4,3,1.5,4,abc\n")
    (tmp_path / "a.tsv").write_text("path\tsource\tfps\tframes\nb.mp4\tssv2\t12\t48\n")
    (tmp_path / "a.jsonl").write_text('{"path": "c.mp4", "source": "ava", "start_frame": 10}\n\n')
    (tmp_path / "pre.txt").write_text("dir with space/d.mp4 0 -1\ne.mp4 5 120\n# comment\n")
    (tmp_path / "ft.txt").write_text("f.mp4 7\n")
    csv_row = read_manifest(tmp_path / "a.csv")[0]
    assert (csv_row.path, csv_row.label, csv_row.start, csv_row.end) == ("x/a.mp4", 3, 1.5, 4.0)
    assert csv_row.extra == {"youtube_id": "abc"}  # unknown columns are kept, not dropped
    tsv_row = read_manifest(tmp_path / "a.tsv")[0]
    assert (tsv_row.source, tsv_row.fps, tsv_row.num_frames) == ("ssv2", 12.0, 48)
    assert read_manifest(tmp_path / "a.jsonl")[0].start_frame == 10
    pre = read_manifest(tmp_path / "pre.txt", default_source="k710")
    assert [(r.path, r.start_frame, r.num_frames, r.source) for r in pre] == \
        [("dir with space/d.mp4", 0, None, "k710"), ("e.mp4", 5, 120, "k710")]
    assert read_manifest(tmp_path / "ft.txt")[0].label == 7
    write_manifest([csv_row, tsv_row], tmp_path / "round.jsonl")
    assert read_manifest(tmp_path / "round.jsonl") == [csv_row, tsv_row]


@pytest.mark.parametrize("name,text,message", [
    ("m.csv", "file,label\na.mp4,1\n,2\n", "m.csv:3: no 'path' field"),
    ("m.jsonl", '{"path": "a.mp4"}\n{"path": \n', "m.jsonl:2: not valid JSON"),
    ("m.jsonl", '["a.mp4"]\n', "m.jsonl:1: expected a JSON object"),
    ("m.tsv", "path\tnum_frames\na.mp4\tmany\n", "m.tsv:2: field 'num_frames' has a bad value 'many'"),
])
def test_bad_manifests_name_file_line_and_field(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / name)


def test_scan_folder_with_labels_from_class_folders(tmp_path):
    for cls in ("walk", "run"):
        (tmp_path / "vids" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "vids" / cls / f"{i}.mp4").write_bytes(b"x")
    (tmp_path / "vids" / "run" / "readme.txt").write_text("x")
    rows = scan_folder(tmp_path / "vids", labels_from_dirs=True)
    assert len(rows) == 4 and {r.source for r in rows} == {"vids"}
    assert {(r.path.split("/")[-2], r.label) for r in rows} == {("run", 0), ("walk", 1)}
    assert len(scan_folder(tmp_path / "vids", all_files=True)) == 5


def _rows(source: str, n: int) -> list[ClipRow]:
    return [ClipRow(path=f"{source}/{i}.mp4") for i in range(n)]


def test_hybrid_default_weights_are_the_papers_and_mix_every_window():
    sizes = {"k710": 488, "ssv2": 125, "ava": 15, "webvid": 185, "instagram": 185}
    rows, plans = compose({k: _rows(k, n) for k, n in sizes.items()}, seed=1)
    assert {p.name: p.weight for p in plans} == PAPER_WEIGHTS
    assert Counter(r.source for r in rows) == Counter(sizes)  # natural sizes already match the shares
    assert len({r.path for r in rows}) == len(rows)
    for start in range(0, len(rows) - 100, 100):  # every 100-row shard holds all five sources
        window = Counter(r.source for r in rows[start:start + 100])
        assert set(window) == set(sizes) and abs(window["k710"] - 49) <= 3


def test_hybrid_weights_override_and_upsample():
    rows, plans = compose({"k710": _rows("k710", 30), "mine": _rows("mine", 5)},
                          weights={"mine": 0.5, "k710": 0.5}, total=40, seed=0)
    counts = Counter(r.source for r in rows)
    assert counts == {"k710": 20, "mine": 20}
    assert max(Counter(r.path for r in rows if r.source == "mine").values()) == 4  # 4 full passes
    assert {p.name: round(p.repeat, 2) for p in plans} == {"k710": 0.67, "mine": 4.0}
    with pytest.raises(ManifestError, match="no default weight: pass --weight mine=W"):
        plan_mix({"mine": 3})


def test_hybrid_cli(tmp_path):
    write_manifest(_rows("a", 8), tmp_path / "k.jsonl")
    (tmp_path / "s.txt").write_text("".join(f"s/{i}.webm 0 -1\n" for i in range(4)))
    res = run_cli("hybrid", "--source", f"k710={tmp_path / 'k.jsonl'}", "--source", f"ssv2={tmp_path / 's.txt'}",
                  "--out", str(tmp_path / "h.jsonl"))
    assert res.returncode == 0, res.stderr
    assert "k710" in res.stdout and "0.488" in res.stdout
    rows = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert Counter(r["source"] for r in rows) == {"k710": 10, "ssv2": 2}  # 12 rows at .488 : .125
    bad = run_cli("hybrid", "--source", "k710", "--out", str(tmp_path / "x.jsonl"))
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_verify_and_stats_of_a_missing_folder_fail_with_one_line(tmp_path):
    for cmd in ("verify", "stats"):
        res = run_cli(cmd, str(tmp_path / "no_such_shards"), "--quiet")
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stdout == ""  # no empty statistics block before the error
        assert res.stderr.strip().count("\n") == 0 and "no_such_shards: no such folder" in res.stderr


@pytest.mark.parametrize("text", ["", "path,label\n"])
def test_build_refuses_a_manifest_without_rows(tmp_path, text):
    (tmp_path / "empty.csv").write_text(text)
    res = run_cli("build", "--manifest", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "shards"),
                  "--workers", "0", "--quiet")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "empty.csv: the manifest has no rows" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["synth", "--out", "{t}/s", "--size", "abc"], "--size must look like HxW, e.g. 96x128, got 'abc'"),
    (["synth", "--out", "{t}/s", "--n", "0"], "--n and --frames must be >= 1"),
    (["hybrid", "--source", "k710={t}/ok.tsv", "--weight", "k710=abc", "--out", "{t}/h.jsonl"],
     "--weight k710=abc: W must be a number"),
    (["hybrid", "--source", "k710={t}/ok.tsv", "--total", "0", "--out", "{t}/h.jsonl"], "--total must be >= 1"),
    (["hybrid", "--source", "k710={t}/header.csv", "--out", "{t}/h.jsonl"], "header.csv: the manifest has no rows"),
    (["build", "--manifest", "{t}/ok.tsv", "--out", "{t}/sh", "--root", "{t}/nope", "--workers", "0"],
     "nope: no such folder"),
    (["manifest", "{t}", "--out", "{t}/h.jsonl"], "no video files (.mp4 .avi"),  # only .tsv/.csv there
    (["build", "--manifest", "{t}", "--out", "{t}/sh"], "a folder, not a manifest (make one with `vmae-shards "
                                                        "manifest")])
def test_cli_bad_values_name_the_flag_in_one_line(tmp_path, args, message):
    (tmp_path / "ok.tsv").write_text("path\tlabel\na.mp4\t1\n")
    (tmp_path / "header.csv").write_text("path,label\n")
    res = run_cli(*(x.replace("{t}", str(tmp_path)) for x in args))
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr
    assert not (tmp_path / "h.jsonl").exists() and not (tmp_path / "s").exists()
