"""Manifest -> `prefix-%06d.tar` WebDataset shards + index.json + errors.jsonl, atomic and resumable.

Design, so a rerun after a crash yields exactly the same samples:
- shard i always holds the manifest rows [i * shard_size, (i + 1) * shard_size) (after the optional
  seeded shuffle), so its content depends only on the manifest and the settings;
- a shard is written as `<name>.tar.tmp`, fsynced and renamed; then its record (samples, errors) is
  written to `_parts/<name>.json` the same way. A shard counts as finished only when its record exists,
  so a rerun redoes any shard that was cut off, and skips the finished ones;
- `build.json` pins the settings: rerunning with different settings into the same folder is refused.

Labels: with a label map (--label-map, or the `.labels.json` that `manifest --labels-from-dirs` writes next
to the manifest) every sample json holds an integer `label` and its `label_name`, the map is written to
`labels.json` and pinned in the settings. Every row's label is checked before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from data_tools.clipcheck import ClipResult, ClipSettings
from data_tools.manifest import ClipRow, ManifestError, labels_path_for, read_manifest
from data_tools.workpool import run_ordered

if TYPE_CHECKING:
    from vmae_ds.data.labels import LabelMap

PARTS = "_parts"
INDEX = "index.json"
ERRORS = "errors.jsonl"
SETTINGS = "build.json"
LABELS = "labels.json"
# Test hook: after this many finished shards, SIGKILL ourselves half-way through the next one.
CRASH_ENV = "VMAE_SHARDS_CRASH_AFTER_SHARDS"


class BuildError(RuntimeError):
    """A build that cannot start or continue; the message says why and what to do."""


@dataclass
class BuildSummary:
    rows: int
    written: int
    skipped: int
    shards: int
    bytes: int
    skipped_by_reason: dict
    out: str

    def text(self) -> str:
        lines = [f"written {self.written} + skipped {self.skipped} = {self.written + self.skipped} "
                 f"(manifest rows: {self.rows}) -> {self.shards} shards, {self.bytes / 1e6:.1f} MB in {self.out}"]
        for reason, n in sorted(self.skipped_by_reason.items(), key=lambda t: -t[1]):
            lines.append(f"  skipped {n:>7}  {reason}")
        if self.skipped:
            lines.append(f"  every skipped clip is listed with its reason in {Path(self.out) / ERRORS}")
        return "\n".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ('not a decodable video: moov atom...' -> 'not a decodable video')."""
    return reason.split(":")[0]


class _ShardWriter:
    """Writes one shard to a temporary name; `finish` makes it visible atomically."""

    def __init__(self, out: Path, name: str):
        self.final = out / f"{name}.tar"
        self.tmp = out / f"{name}.tar.tmp"
        import webdataset as wds  # imported here: it pulls in torch, which the other commands never need

        self.file = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=0.0)  # fixed mtime: reproducible bytes

    def write(self, r: ClipResult) -> None:
        meta = json.dumps(r.meta, sort_keys=True).encode()
        self.tar.write({"__key__": r.key, r.ext: r.video, "json": meta})

    def finish(self) -> int:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        return self.final.stat().st_size


def build_shards(manifest: str | Path, out: str | Path, *, prefix: str = "shard", shard_size: int = 1000,
                 workers: int = 1, clip: ClipSettings | None = None, root: str | Path | None = None,
                 manifest_format: str = "auto", shuffle_seed: int | None = None,
                 label_map: str | Path | LabelMap | None = None, progress: bool = True) -> BuildSummary:
    """Build (or finish building) the shards of `manifest` in `out`. See the module docstring.

    `label_map`: a LabelMap, or a labels.json / class-name file; None: the manifest's `.labels.json`
    sidecar when it exists and the rows have labels, else no map (labels stored as they are).
    """
    manifest, out = Path(manifest), Path(out)
    clip = clip or ClipSettings()
    if shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {shard_size}")
    if not prefix or any(c in prefix for c in "/.% "):
        raise BuildError(f"--prefix must be a plain name without '/', '.', '%' or spaces, got {prefix!r}")
    if root is not None and not Path(root).is_dir():  # else every clip would be skipped as a missing file
        raise BuildError(f"--root {root}: no such folder")
    rows = read_manifest(manifest, manifest_format)
    if not rows:
        raise BuildError(f"{manifest}: the manifest has no rows, nothing to build")
    labels, label_ids = resolve_labels(rows, manifest, label_map)
    base = Path(root) if root else manifest.resolve().parent
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    settings = {"manifest": str(manifest.resolve()), "manifest_sha256": _sha256(manifest),
                "rows": len(rows), "prefix": prefix, "shard_size": shard_size, "root": str(base),
                "shuffle_seed": shuffle_seed, **asdict(clip)}
    if labels is not None:  # only then: settings of unlabelled builds stay as they were
        settings["labels"] = f"{len(labels)} classes, sha256 {labels.fingerprint()[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    _check_settings(out / SETTINGS, settings)

    num_shards = math.ceil(len(rows) / shard_size)
    names = [f"{prefix}-{i:06d}" for i in range(num_shards)]
    done = {i for i, n in enumerate(names) if (out / PARTS / f"{n}.json").exists()}
    for stale in out.glob(f"{prefix}-*.tar.tmp"):
        stale.unlink()  # leftovers of a killed run; their shards are redone below
    pending = [i for i in range(num_shards) if i not in done]


    def tasks():  # generated lazily: a million-row manifest needs no second copy in memory
        for s in pending:
            for pos in order[s * shard_size:(s + 1) * shard_size]:
                row = rows[pos]
                path = Path(row.path) if Path(row.path).is_absolute() else base / row.path
                yield pos, row.__dict__, str(path), clip

    total = sum(len(order[s * shard_size:(s + 1) * shard_size]) for s in pending)
    if done:
        print(f"resuming: {len(done)} of {num_shards} shards already finished, {len(pending)} to build")

    crash_after = int(os.environ.get(CRASH_ENV, "-1"))
    bar = tqdm(total=total, unit="clip", desc="build", disable=not progress, smoothing=0.05)
    failures = 0
    task_iter = run_ordered(tasks(), workers)
    try:
        for n_built, s in enumerate(pending):
            name = names[s]
            size = len(order[s * shard_size:(s + 1) * shard_size])
            writer: _ShardWriter | None = None
            errors, sources = [], Counter()
            for j in range(size):
                r = next(task_iter)
                if r.ok:
                    if labels is not None:  # set here, not in the worker: the map never travels to workers
                        r.meta["label"] = label_ids[r.row]
                        r.meta["label_name"] = labels.name(label_ids[r.row])
                    writer = writer or _ShardWriter(out, name)
                    writer.write(r)
                    sources[r.meta["source"]] += 1
                else:
                    failures += 1
                    row = rows[r.row]
                    errors.append({"row": r.row, "key": r.key, "path": row.path, "source": row.source,
                                   "reason": r.reason})
                bar.update(1)
                bar.set_postfix(failed=failures, refresh=False)
                if n_built == crash_after and j == size // 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            nbytes = writer.finish() if writer else 0
            record = {"name": name, "shard": s, "samples": sum(sources.values()), "bytes": nbytes,
                      "sources": dict(sorted(sources.items())), "rows": size, "errors": errors}
            _atomic_write(out / PARTS / f"{name}.json", json.dumps(record, indent=1).encode())
    finally:
        bar.close()
        task_iter.close()  # stops the worker processes
    return finalize(out, names, settings, labels)


def _load_label_map(label_map: str | Path | LabelMap) -> LabelMap:
    from vmae_ds.data.labels import LabelMap  # here: the package pulls in torch, which `manifest` never needs

    return label_map if isinstance(label_map, LabelMap) else LabelMap.from_file(label_map)


def resolve_labels(rows: list[ClipRow], manifest: Path,
                   label_map: str | Path | LabelMap | None) -> tuple[LabelMap | None, list[int]]:
    """The build's label map and every row's class id, or ManifestError naming the first bad row."""
    sidecar = labels_path_for(manifest)
    if label_map is None and sidecar.is_file() and any(r.label is not None for r in rows):
        label_map = sidecar
    if label_map is None:
        named = next((i for i, r in enumerate(rows) if isinstance(r.label, str)), None)
        if named is not None:
            raise ManifestError(f"{_where(rows, named, manifest)}: label {rows[named].label!r} is a class name, "
                                f"but no label map was given (--label-map labels.json or a class-name file)")
        return None, []
    labels = _load_label_map(label_map)
    ids = [_class_id(row, labels, _where(rows, i, manifest)) for i, row in enumerate(rows)]
    if isinstance(label_map, (str, Path)):
        print(f"labels: {len(labels)} classes from {label_map}")
    return labels, ids


def _where(rows: list[ClipRow], i: int, manifest: Path) -> str:
    return rows[i].where or f"{manifest} row {i}"


def _class_id(row: ClipRow, labels: LabelMap, where: str) -> int:
    if row.label is None:
        raise ManifestError(f"{where}: no label, but the build has a label map: every clip needs one")
    if isinstance(row.label, int):
        if not 0 <= row.label < len(labels):
            raise ManifestError(f"{where}: label {row.label} is outside [0, {len(labels)}) of the label map "
                                f"({len(labels)} classes)")
        return row.label
    i = labels.get(row.label)
    if i is None:
        raise ManifestError(f"{where}: unknown label {row.label!r}, not among the {len(labels)} classes of the "
                            f"label map ({labels.describe_known(row.label)})")
    return i


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise BuildError(f"{path.parent} holds a build made with other settings ({k}: {old.get(k)!r} "
                             f"there, {settings.get(k)!r} now): use a new --out folder")
    else:
        _atomic_write(path, json.dumps(settings, indent=1).encode())


def finalize(out: Path, names: list[str], settings: dict, labels: LabelMap | None = None) -> BuildSummary:
    """Write index.json, errors.jsonl (and labels.json) from the per-shard records; reconcile the counts."""
    records = [json.loads((out / PARTS / f"{n}.json").read_text()) for n in names]
    errors = [e for r in records for e in r["errors"]]
    written = sum(r["samples"] for r in records)
    if written + len(errors) != settings["rows"]:
        raise BuildError(f"counts do not reconcile: written {written} + skipped {len(errors)} != "
                         f"{settings['rows']} manifest rows; delete {out / PARTS} and rebuild")
    per_source: Counter = Counter()
    for r in records:
        per_source.update(r["sources"])
    shards = [{k: r[k] for k in ("name", "samples", "bytes", "sources")} | {"file": f"{r['name']}.tar"}
              for r in records if r["samples"]]
    reasons = Counter(_reason_kind(e["reason"]) for e in errors)
    index = {"format": "vmae_ds-shards-v1", "shards": shards, "num_shards": len(shards),
             "total_samples": written, "total_bytes": sum(s["bytes"] for s in shards),
             "per_source": dict(sorted(per_source.items())), "manifest_rows": settings["rows"],
             "skipped": len(errors), "skipped_by_reason": dict(reasons), "settings": settings}
    if labels is not None:
        _atomic_write(out / LABELS, labels.dumps().encode())
        index |= {"labels": LABELS, "num_classes": len(labels)}
    _atomic_write(out / INDEX, json.dumps(index, indent=1).encode())
    _atomic_write(out / ERRORS, "".join(json.dumps(e) + "\n" for e in errors).encode())
    return BuildSummary(settings["rows"], written, len(errors), len(shards), index["total_bytes"],
                        dict(reasons), str(out))
