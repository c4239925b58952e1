"""Class label maps: id <-> name, class-name files, and slicing a classifier head to another label set.

A K710 head initialises a K400 / K600 / K700 head by picking, for every target class, the row of the
source class with the same name. Kinetics versions spell names differently ("passing American football
(in game)" vs "passing_american_football_(in_game)"), so names are compared after `normalize_class_name`.
Class names come from files the user supplies; nothing is downloaded.

torch is imported only by `slice_head`: the shard tools use this module without it.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

LABELS_FORMAT = "vmae_ds-labels-v1"
# Header words of `id,name` class-name files (Kinetics' own csv has `id,name`).
_ID_HEADERS = {"id", "index", "idx", "label_id", "class_id", "label_index"}
_NAME_HEADERS = {"name", "class", "label", "class_name", "label_name", "classname"}
# Quotes and brackets differ between Kinetics releases and tools; none of them tells two classes apart.
_DROPPED = str.maketrans("", "", "\"'`\u2018\u2019\u201c\u201d()[]")
_SEPARATORS = re.compile(r"[\s_]+")


class LabelError(ValueError):
    """A label map, class-name file or head slice that cannot be used; the message names file/line/class."""


def normalize_class_name(name: str) -> str:
    """The form class names are matched in: case-folded, quotes and brackets dropped, `_`/spaces -> one space."""
    text = unicodedata.normalize("NFKC", name).casefold().translate(_DROPPED)
    return _SEPARATORS.sub(" ", text).strip()


def _quote_list(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


class LabelMap:
    """Class ids 0..N-1 and their names. Names must differ even after normalisation."""

    def __init__(self, classes: Iterable[str]):
        self.classes: list[str] = list(classes)
        if not self.classes:
            raise LabelError("a label map needs at least one class name")
        self._by_name: dict[str, int] = {}
        self._by_norm: dict[str, int] = {}
        for i, name in enumerate(self.classes):
            if not isinstance(name, str) or not name.strip():
                raise LabelError(f"class {i}: the name must be a non-empty string, got {name!r}")
            key = normalize_class_name(name)
            if key in self._by_norm:
                j = self._by_norm[key]
                raise LabelError(f"class {i} {name!r} duplicates class {j} {self.classes[j]!r}")
            self._by_name[name] = i
            self._by_norm[key] = i

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.classes)

    def __getitem__(self, i: int) -> str:
        return self.classes[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.classes == other.classes

    def __repr__(self) -> str:
        return f"LabelMap({len(self)} classes: {_quote_list(self.classes, 3)})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def name(self, i: int) -> str:
        if not 0 <= i < len(self.classes):
            raise LabelError(f"class id {i} is outside [0, {len(self.classes)})")
        return self.classes[i]

    def get(self, name: str) -> int | None:
        """Id of `name`: the exact spelling first, else the normalised one; None when absent."""
        i = self._by_name.get(name)
        return i if i is not None else self._by_norm.get(normalize_class_name(name))

    def index(self, name: str) -> int:
        i = self.get(name)
        if i is None:
            raise LabelError(f"unknown class {name!r} ({self.describe_known(name)})")
        return i

    def describe_known(self, name: str, limit: int = 5) -> str:
        """Close spellings of `name` if any, else the first few classes: for 'unknown class' messages."""
        close = difflib.get_close_matches(normalize_class_name(name), list(self._by_norm), n=3, cutoff=0.6)
        if close:
            return "did you mean " + " or ".join(repr(self.classes[self._by_norm[c]]) for c in close) + "?"
        return f"known: {_quote_list(self.classes, limit)}"

    def fingerprint(self) -> str:
        """sha256 of the class list: pins a label map in build settings."""
        return hashlib.sha256(json.dumps(self.classes, ensure_ascii=False).encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": LABELS_FORMAT, "num_classes": len(self.classes), "classes": self.classes}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """A labels.json written by `save` (`{"format": "vmae_ds-labels-v1", "classes": [...]}`)."""
        path = Path(path)
        obj = _read_json(path)
        if not isinstance(obj, dict) or obj.get("format") != LABELS_FORMAT:
            raise LabelError(f"{path}: not a vmae_ds labels file (expected \"format\": \"{LABELS_FORMAT}\")")
        return _checked(cls, obj.get("classes"), f"{path}: field 'classes'")

    @classmethod
    def from_file(cls, path: str | Path) -> LabelMap:
        """labels.json, a JSON list of names or {name: id} map, or a class-name text file (`read_class_names`)."""
        path = Path(path)
        if not path.is_file():
            raise LabelError(f"{path}: label file not found")
        head = path.read_text(encoding="utf-8-sig").lstrip()[:1]
        if path.suffix.lower() != ".json" and head not in ("{", "["):
            return _checked(cls, read_class_names(path), str(path))
        obj = _read_json(path)
        if isinstance(obj, dict) and "format" in obj:
            return cls.load(path)
        if isinstance(obj, list):
            return _checked(cls, obj, str(path))
        if isinstance(obj, dict):  # {name: id}, as Something-Something V2's labels json
            return _checked(cls, _names_by_id(obj, path), str(path))
        raise LabelError(f"{path}: expected a list of class names or a {{name: id}} object")

    @classmethod
    def from_dirs(cls, names: Iterable[str]) -> LabelMap:
        """Folder names (repeats allowed) -> classes in sorted order: the `root/<class>/<clip>` convention."""
        return cls(sorted(set(names)))


def _checked(cls: type[LabelMap], classes: object, where: str) -> LabelMap:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise LabelError(f"{where}: expected a list of class-name strings")
    try:
        return cls(classes)
    except LabelError as e:
        raise LabelError(f"{where}: {e}") from None


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise LabelError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _names_by_id(obj: dict, path: Path) -> list[str]:
    by_id: dict[int, str] = {}
    for name, value in obj.items():
        try:
            i = int(value)
        except (TypeError, ValueError):
            raise LabelError(f"{path}: class {name!r} has a non-integer id {value!r}") from None
        if i in by_id:
            raise LabelError(f"{path}: id {i} is given to both {by_id[i]!r} and {name!r}")
        by_id[i] = name
    return _dense(by_id, str(path))


def _dense(by_id: dict[int, str], where: str) -> list[str]:
    missing = [i for i in range(len(by_id)) if i not in by_id]
    if missing:
        raise LabelError(f"{where}: class ids must run 0..{len(by_id) - 1} without gaps; missing "
                         f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")
    return [by_id[i] for i in range(len(by_id))]


def _is_int(text: str) -> bool:
    return text.isdigit() or (text[:1] == "-" and text[1:].isdigit())


def _id_column(fields: list[str]) -> int | None:
    """0 for an `id,name` line, 1 for `name,id`, None for anything else."""
    if len(fields) != 2 or _is_int(fields[0]) == _is_int(fields[1]):
        return None
    return 0 if _is_int(fields[0]) else 1


def read_class_names(path: str | Path) -> list[str]:
    """Class names in id order from a text file: one name per line, or `id,name` / `name,id` lines
    (comma or tab separated, optional header such as Kinetics' `id,name`, quotes allowed).

    The layout is taken from the first line and every line must follow it. Blank lines are ignored;
    a repeated name (also after normalisation) or id is an error naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: class-name file not found")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
             if line.strip()]
    if not lines:
        raise LabelError(f"{path}: no class names in the file")
    delimiter = "\t" if "\t" in lines[0][1] else ","
    rows = [(n, line, [f.strip() for f in next(csv.reader([line], delimiter=delimiter))]) for n, line in lines]
    id_col = _header_id_column(rows[0][2])
    if id_col is not None:
        rows = rows[1:]
        if not rows:
            raise LabelError(f"{path}: a header but no class names")
    else:
        id_col = _id_column(rows[0][2])
    first = rows[0][0]
    layout = "a plain name" if id_col is None else ("'id,name'" if id_col == 0 else "'name,id'")
    by_id: dict[int, str] = {}
    seen: dict[str, int] = {}  # normalised name -> line
    id_lines: dict[int, int] = {}
    for n, line, fields in rows:
        where = f"{path}:{n}"
        if _id_column(fields) != id_col:
            raise LabelError(f"{where}: expected {layout} like line {first}, got {line!r}")
        if id_col is None:  # the whole line is the name (it may hold commas); csv-style quotes removed
            i, name = len(by_id), line[1:-1].strip() if len(line) > 1 and line[0] == line[-1] == '"' else line
        else:
            i, name = int(fields[id_col]), fields[1 - id_col]
            if i in id_lines:
                raise LabelError(f"{where}: id {i} repeated (first on line {id_lines[i]})")
            id_lines[i] = n
        key = normalize_class_name(name)
        if not key:
            raise LabelError(f"{where}: empty class name")
        if key in seen:
            raise LabelError(f"{where}: duplicate class name {name!r} (first on line {seen[key]})")
        seen[key] = n
        by_id[i] = name
    return _dense(by_id, str(path))


def _header_id_column(fields: list[str]) -> int | None:
    low = [f.lower() for f in fields]
    if len(low) == 2 and low[0] in _ID_HEADERS and low[1] in _NAME_HEADERS:
        return 0
    if len(low) == 2 and low[0] in _NAME_HEADERS and low[1] in _ID_HEADERS:
        return 1
    return None


def head_index_map(source: LabelMap, target: LabelMap, aliases: Mapping[str, str] | None = None) -> list[int]:
    """For every target class, the source class (row of the source head) with the same normalised name.

    `aliases` maps a target name to its source spelling, for classes renamed between label sets
    (Kinetics-710 merged 15 names across K400/K600/K700).
    """
    renamed = {normalize_class_name(k): v for k, v in (aliases or {}).items()}
    rows: list[int] = []
    unmatched: list[str] = []
    for name in target:
        i = source.get(renamed.get(normalize_class_name(name), name))
        if i is None:
            unmatched.append(name)
        else:
            rows.append(i)
    if unmatched:
        raise LabelError(f"{len(unmatched)} of {len(target)} target classes are not in the source label map "
                         f"({len(source)} classes): {_quote_list(unmatched, 10)}; give their source names "
                         f"as aliases if they were renamed")
    return rows


def slice_head(weight: Tensor, bias: Tensor | None, index_map: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Rows `index_map` of a classifier head (weight (C_src, D), bias (C_src,) or None), detached copies."""
    import torch

    if weight.dim() != 2:
        raise LabelError(f"head weight must be 2-D (classes, features), got shape {tuple(weight.shape)}")
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise LabelError(f"head bias shape {tuple(bias.shape)} does not match the weight's {n} classes")
    if len(index_map) == 0:
        raise LabelError("empty index map: the target head would have no classes")
    bad = [i for i in index_map if not 0 <= int(i) < n]
    if bad:
        raise LabelError(f"index map rows {_quote_list(bad, 10)} are outside the source head's [0, {n})")
    idx = torch.as_tensor([int(i) for i in index_map], dtype=torch.long, device=weight.device)
    picked_bias = bias.detach().index_select(0, idx) if bias is not None else None
    return weight.detach().index_select(0, idx), picked_bias
