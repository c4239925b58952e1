"""Clip manifests: one row per clip, read from CSV / TSV / JSONL or the authors' plain lists.

Plain list formats (whitespace separated, as in the VideoMAE code):
  `path start total`  pretraining list: start frame and total frames (total <= 0: unknown)
  `path label`        fine-tuning list: integer class label
  `path`              just the clip
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ts")
FORMATS = ("auto", "csv", "tsv", "jsonl", "list")

# Column names accepted in CSV / TSV / JSONL, mapped to ClipRow fields.
ALIASES = {
    "path": "path", "video": "path", "file": "path", "filename": "path", "video_path": "path",
    "source": "source", "dataset": "source",
    "label": "label", "class": "label",
    "start": "start", "time_start": "start", "end": "end", "time_end": "end",
    "start_frame": "start_frame",
    "fps": "fps",
    "num_frames": "num_frames", "frames": "num_frames", "total_frames": "num_frames",
    "frame_count": "num_frames",
}


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message names file, line and field."""


@dataclass
class ClipRow:
    """One clip. `start`/`end` are seconds, `start_frame` a frame index (authors' list)."""

    path: str
    source: str = "unknown"
    label: int | str | None = None
    start: float | None = None
    end: float | None = None
    start_frame: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    extra: dict = field(default_factory=dict)
    # "file:line" it was read from, so a label error can name it; not compared, not written out.
    where: str = field(default="", compare=False, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}) and k != "where"}


def _convert(name: str, value, where: str):
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        if name in ("start", "end", "fps"):
            return float(value)
        if name in ("start_frame", "num_frames"):
            return int(float(value))
        if name == "label":
            return int(value) if str(value).lstrip("-").isdigit() else str(value)
        return str(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: field '{name}' has a bad value {value!r}") from None


def row_from_mapping(d: dict, where: str, default_source: str = "unknown") -> ClipRow:
    kwargs: dict = {}
    extra: dict = {}
    for key, value in d.items():
        field_name = ALIASES.get(str(key).strip().lower())
        if key == "extra" and isinstance(value, dict):
            extra.update(value)  # our own JSONL round-trips extra columns this way
        elif field_name is None:
            extra[str(key)] = value  # kept and stored with the clip, never dropped
        elif field_name == "path" and "path" in kwargs:
            raise ManifestError(f"{where}: two path columns ('{key}' and another alias)")
        else:
            kwargs[field_name] = _convert(field_name, value, where)
    if not kwargs.get("path"):
        raise ManifestError(f"{where}: no 'path' field (accepted: path, video, file, filename, video_path)")
    kwargs.setdefault("source", None)
    if kwargs["source"] is None:
        kwargs["source"] = default_source
    return ClipRow(extra=extra, where=where, **kwargs)


def _parse_list_line(line: str, where: str, default_source: str) -> ClipRow:
    parts = line.split()

    def is_int(s: str) -> bool:
        return s.lstrip("-").isdigit()

    # Paths may contain spaces, so numbers are taken from the right.
    if len(parts) >= 3 and is_int(parts[-1]) and is_int(parts[-2]):
        path, start, total = line.rsplit(maxsplit=2)
        n = int(total)
        return ClipRow(path=path, source=default_source, start_frame=int(start),
                       num_frames=n if n > 0 else None, where=where)
    if len(parts) >= 2 and is_int(parts[-1]):
        path, label = line.rsplit(maxsplit=1)
        return ClipRow(path=path, source=default_source, label=int(label), where=where)
    return ClipRow(path=line.strip(), source=default_source, where=where)


def labels_path_for(manifest: str | Path) -> Path:
    """Where `manifest --labels-from-dirs` writes the class names of `manifest` (m.jsonl -> m.labels.json)."""
    return Path(manifest).with_suffix(".labels.json")


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "list")


def read_manifest(path: str | Path, fmt: str = "auto", default_source: str = "unknown") -> list[ClipRow]:
    """All rows of a manifest; raises ManifestError naming file:line on the first bad row."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: a folder, not a manifest (make one with `vmae-shards manifest {path} --out "
                            f"m.jsonl`)")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    if fmt not in FORMATS:
        raise ManifestError(f"{path}: unknown manifest format {fmt!r} (choose from {FORMATS})")
    fmt = detect_format(path) if fmt == "auto" else fmt
    rows: list[ClipRow] = []
    with open(path, newline="", encoding="utf-8") as f:
        if fmt in ("csv", "tsv"):
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            for i, rec in enumerate(reader, start=2):
                rows.append(row_from_mapping(rec, f"{path}:{i}", default_source))
        elif fmt == "jsonl":
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ManifestError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
                rows.append(row_from_mapping(rec, f"{path}:{i}", default_source))
        else:
            for i, line in enumerate(f, start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    rows.append(_parse_list_line(line.rstrip("\n"), f"{path}:{i}", default_source))
    return rows


def write_manifest(rows: Iterable[ClipRow], path: str | Path) -> int:
    """Write rows as JSONL (the canonical format of this project); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_json(), sort_keys=True) + "\n")
            n += 1
    return n


def scan_folder(root: str | Path, *, source: str | None = None, labels_from_dirs: bool = False,
                all_files: bool = False) -> list[ClipRow]:
    """One row per video file under `root` (sorted, recursive). Paths are absolute.

    `labels_from_dirs`: label = index of the immediate parent folder name in sorted order
    (the usual `root/<class>/<clip>` layout; `LabelMap.from_dirs` gives the same class order).
    `all_files`: list every file, not only video extensions, so the builder can report the non-videos
    instead of never seeing them.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and (all_files or p.suffix.lower() in VIDEO_EXTS))
    classes = sorted({p.parent.name for p in files}) if labels_from_dirs else []
    rows = []
    for p in files:
        label = classes.index(p.parent.name) if labels_from_dirs else None
        rows.append(ClipRow(path=str(p), source=source or root.name, label=label))
    return rows
