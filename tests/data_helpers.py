"""Shared inputs for the data tests: real H.264 clips made by PyAV, bad files of every kind, built shards.

Everything is built once per test session (cached by folder) and kept tiny (48x64, 24-30 frames).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data_tools.build import build_shards
from data_tools.clipcheck import ClipSettings
from data_tools.manifest import ClipRow, write_manifest
from data_tools.synth import make_videos, write_video

REPO = Path(__file__).resolve().parents[1]
GOOD_PER_SOURCE = {"k710": 10, "ssv2": 6}
# Bad inputs and the reason (prefix) the builder must give for each.
BAD_REASONS = {
    "corrupt.mp4": "not a decodable video",
    "truncated.mp4": "not a decodable video: truncated",
    "cut_faststart.mp4": "damaged or truncated video",
    "empty.mp4": "empty file (0 bytes)",
    "notes.txt": "not a decodable video",
    "short.mp4": "too short",
    "missing.mp4": "missing file",
}


@dataclass
class Corpus:
    root: Path
    manifest: Path
    good: list[Path]
    bad: dict[str, Path]

    @property
    def rows(self) -> int:
        return len(self.good) + len(self.bad)


def make_corpus(root: Path) -> Corpus:
    """Good clips of two sources plus one bad file of each kind, listed in one JSONL manifest."""
    if (root / "manifest.jsonl").exists():
        return _load(root)
    good: list[Path] = []
    rows: list[ClipRow] = []
    for i, (source, n) in enumerate(GOOD_PER_SOURCE.items()):
        paths = make_videos(root / source, n, frames=30, size=(48, 64), fps=25, seed=100 * i)
        good += paths
        rows += [ClipRow(path=str(p), source=source, label=j % 3) for j, p in enumerate(paths)]
    bad_dir = root / "bad"
    bad_dir.mkdir()
    sample = good[0].read_bytes()
    (bad_dir / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 20)
    (bad_dir / "truncated.mp4").write_bytes(sample[: len(sample) // 2])
    full = write_video(bad_dir / "full_faststart.mp4", frames=30, size=(48, 64), fps=25, seed=9, faststart=True)
    (bad_dir / "cut_faststart.mp4").write_bytes(full.read_bytes()[: full.stat().st_size * 3 // 4])
    full.unlink()
    (bad_dir / "empty.mp4").write_bytes(b"")
    (bad_dir / "notes.txt").write_text("these are not the frames you are looking for\n")
    write_video(bad_dir / "short.mp4", frames=8, size=(48, 64), fps=25, seed=7)
    bad = {name: bad_dir / name for name in BAD_REASONS}
    # Bad rows are spread between good ones, so several shards hold skipped rows.
    for k, path in enumerate(bad.values()):
        rows.insert(3 * k + 1, ClipRow(path=str(path), source="k710"))
    write_manifest(rows, root / "manifest.jsonl")
    (root / "corpus.json").write_text(json.dumps({"good": [str(p) for p in good],
                                                  "bad": {k: str(v) for k, v in bad.items()}}))
    return _load(root)


def _load(root: Path) -> Corpus:
    d = json.loads((root / "corpus.json").read_text())
    return Corpus(root, root / "manifest.jsonl", [Path(p) for p in d["good"]],
                  {k: Path(v) for k, v in d["bad"].items()})


def build(corpus: Corpus, out: Path, **kw) -> Path:
    """Build shards of the corpus once into `out` (reused when already there)."""
    if not (out / "index.json").exists():
        kw.setdefault("shard_size", 5)
        kw.setdefault("workers", 2)
        build_shards(corpus.manifest, out, progress=False, clip=kw.pop("clip", ClipSettings()), **kw)
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m data_tools ...` in a subprocess (what a user types, through the same entry point)."""
    return subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def sample_keys(folder: Path) -> dict[str, bytes]:
    """key -> video bytes over all shards of a folder."""
    out: dict[str, bytes] = {}
    for tar in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            assert s["__key__"] not in out, f"duplicate key {s['__key__']}"
            out[s["__key__"]] = s["mp4"]
    return out


def write_shard_with_bad_samples(good_shard: Path, out: Path) -> tuple[Path, int, list[str]]:
    """Copy of a good shard with corrupt samples inserted: garbage video, broken json, a bad json value.

    Returns (path, good samples, corrupt keys).
    """
    samples = list(wds.WebDataset(str(good_shard), shardshuffle=False, empty_check=False))
    bad_keys = ["zz_garbage_video", "zz_bad_json", "zz_bad_window"]
    with wds.TarWriter(str(out), encoder=False) as w:
        for i, s in enumerate(samples):
            w.write({"__key__": s["__key__"], "mp4": s["mp4"], "json": s["json"]})
            if i == 0:
                w.write({"__key__": bad_keys[0], "mp4": b"\x00" * 3000, "json": s["json"]})
            if i == 1:
                w.write({"__key__": bad_keys[1], "mp4": s["mp4"], "json": b"{not json"})
                w.write({"__key__": bad_keys[2], "mp4": s["mp4"], "json": b'{"frame_start": "soon"}'})
    return out, len(samples), bad_keys


def shared_dir(tmp_path_factory, name: str, create: bool = True) -> Path:
    """A folder shared by all data test modules of this session (corpus and shards are built once)."""
    path = tmp_path_factory.getbasetemp() / name
    if create:
        path.mkdir(exist_ok=True)
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


SIZES = (7, 3, 11, 1)  # uneven shard sizes: splits at sample level are needed for exact epochs


def uneven_shards(tmp_path_factory, sizes: tuple[int, ...] = SIZES) -> Path:
    """Shards of the given sizes from the corpus' real H.264 clips, with an index.json (built once)."""
    folder = shared_dir(tmp_path_factory, "uneven_" + "_".join(map(str, sizes)))
    if (folder / "index.json").exists():
        return folder
    clips = [p.read_bytes() for p in make_corpus(shared_dir(tmp_path_factory, "data_corpus")).good]
    entries, n = [], 0
    for s, size in enumerate(sizes):
        name = f"uneven-{s:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as w:
            for i in range(size):
                meta = {"source": "k710", "label": n % 3}
                w.write({"__key__": f"s{s}_{i:02d}", "mp4": clips[n % len(clips)], "json": json.dumps(meta).encode()})
                n += 1
        entries.append({"file": name, "samples": size})
    (folder / "index.json").write_text(json.dumps({"shards": entries}))
    return folder


def all_keys(sizes: tuple[int, ...] = SIZES) -> Counter:
    return Counter(f"uneven-{s:06d}.tar/s{s}_{i:02d}" for s, size in enumerate(sizes) for i in range(size))


def sized_shards(tmp_path_factory) -> Path:
    """The uneven shards with an index.json as vmae-shards build writes it (byte sizes, total) and a
    labels.json: the folder the remote-shard tests serve (built once)."""
    out = shared_dir(tmp_path_factory, "sized_shards")
    if (out / "index.json").exists():
        return out
    src = uneven_shards(tmp_path_factory)
    index = json.loads((src / "index.json").read_text())
    for e in index["shards"]:
        shutil.copy(src / e["file"], out / e["file"])
        e["bytes"] = (out / e["file"]).stat().st_size
    index["total_samples"] = sum(e["samples"] for e in index["shards"])
    (out / "labels.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    (out / "index.json").write_text(json.dumps(index))
    return out


def reader_positions(state: dict) -> list[dict]:
    """A loader state's reader positions without the read time each one carries (a measurement, not a place)."""
    return [{k: v for k, v in p.items() if k != "read_ms"} for p in state["positions"]]
