"""Scoring test-time predictions (top-1/top-5, per class, confusion) and writing eval.json / eval.md / confusion.png.

Pure functions on CPU tensors: the caller gathers the per-video scores of all ranks and hands them to one
EvalAccumulator, which refuses a video index seen twice, so a video is never counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TOP_K = 5
PER_CLASS_TABLE_MAX = 50  # classes: above this the markdown lists the weakest classes, and no PNG is drawn
CELL_COUNTS_MAX = 20  # classes: up to this the PNG prints the count in every cell
SHOWN_INVALID = 20


class EvalError(ValueError):
    """Scores that cannot be counted (a video twice, a bad label or shape); the message names the video index."""


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]; None where nothing was scored (no videos, or a class without videos)."""

    num_classes: int
    class_names: list[str]
    count: int  # videos scored (valid)
    top1: float | None
    top5: float | None
    top5_k: int  # the k of "top-5": 5, or the number of classes when there are fewer
    per_class_accuracy: list[float | None]
    per_class_support: list[int]
    per_class_correct: list[int]
    mean_class_accuracy: float | None  # over the classes that have videos
    confusion: Tensor  # (C, C) int64, rows = true class, columns = predicted class
    invalid: list[int]  # indices of the videos that could not be decoded (not scored)

    def to_json(self) -> dict:
        per_class = [{"id": i, "name": n, "support": s, "correct": c, "accuracy": a} for i, (n, s, c, a) in
                     enumerate(zip(self.class_names, self.per_class_support, self.per_class_correct,
                                   self.per_class_accuracy))]
        return {"count": self.count, "top1": self.top1, "top5": self.top5, "top5_k": self.top5_k,
                "mean_class_accuracy": self.mean_class_accuracy, "num_classes": self.num_classes,
                "invalid_count": len(self.invalid), "invalid": self.invalid, "per_class": per_class,
                "confusion": self.confusion.tolist()}


def _cpu(x: Tensor, name: str, dims: int) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() != dims:
        raise EvalError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    return x.detach().cpu()


class EvalAccumulator:
    """One entry per video index. `add` takes a batch of per-video scores (softmax averaged over views).

    Entries with index < 0 are padding (EvalLoader's filler) and are ignored; entries with valid=False
    and index >= 0 are videos that could not be decoded, listed in `EvalResult.invalid`.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise EvalError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.k = min(TOP_K, num_classes)
        self._seen: set[int] = set()
        self._invalid: list[int] = []
        self._labels: list[Tensor] = []
        self._topk: list[Tensor] = []  # (n, k) class ids, best first; all that the metrics need

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, indices: Tensor, probs: Tensor, labels: Tensor, valid: Tensor) -> None:
        """indices (B,), probs (B, C), labels (B,), valid (B,) bool. Checked whole before anything is kept."""
        idx = _cpu(indices, "indices", 1).long()
        probs, labels, valid = _cpu(probs, "probs", 2), _cpu(labels, "labels", 1).long(), _cpu(valid, "valid", 1)
        b = idx.shape[0]
        if probs.shape != (b, self.num_classes) or labels.shape[0] != b or valid.shape[0] != b:
            raise EvalError(f"expected probs ({b}, {self.num_classes}), labels ({b},), valid ({b},) for {b} "
                            f"indices; got {tuple(probs.shape)}, {tuple(labels.shape)}, {tuple(valid.shape)}")
        real, valid = idx >= 0, valid.bool()
        keys = idx[real].tolist()
        self._refuse_repeats(keys)
        ok = real & valid
        lab, scores = labels[ok], probs[ok].float()
        out = (lab < 0) | (lab >= self.num_classes)
        if out.any():
            i = int(out.nonzero()[0])
            raise EvalError(f"video index {int(idx[ok][i])}: label {int(lab[i])} is outside [0, {self.num_classes})"
                            f" (-1 means its shard json has no integer label)")
        bad = ~torch.isfinite(scores).all(dim=1)
        if bad.any():
            raise EvalError(f"video index {int(idx[ok][int(bad.nonzero()[0])])}: non-finite scores")
        self._seen.update(keys)
        self._invalid += idx[real & ~valid].tolist()
        self._labels.append(lab)
        self._topk.append(scores.topk(self.k, dim=1).indices)

    def _refuse_repeats(self, keys: list[int]) -> None:
        batch: set[int] = set()
        for k in keys:
            if k in self._seen:
                raise EvalError(f"video index {k} was already added: each video must be scored once "
                                f"(a rank's results counted twice?)")
            if k in batch:
                raise EvalError(f"video index {k} appears twice in one batch: each video must be scored once")
            batch.add(k)

    def merge(self, other: EvalAccumulator) -> None:
        """Take in the videos of another accumulator (same classes, no shared index)."""
        if other.num_classes != self.num_classes:
            raise EvalError(f"cannot merge {other.num_classes}-class scores into {self.num_classes}-class ones")
        again = sorted(self._seen & other._seen)
        if again:
            raise EvalError(f"video index {again[0]} is in both accumulators ({len(again)} shared): "
                            f"each video must be scored once")
        self._seen |= other._seen
        self._invalid += other._invalid
        self._labels += other._labels
        self._topk += other._topk

    def result(self, class_names: Sequence[str] | None = None) -> EvalResult:
        c = self.num_classes
        names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
        if len(names) != c:
            raise EvalError(f"{len(names)} class names given for {c} classes")
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)
        topk = torch.cat(self._topk) if self._topk else torch.zeros(0, self.k, dtype=torch.long)
        pred = topk[:, 0]
        confusion = torch.bincount(labels * c + pred, minlength=c * c).view(c, c)
        support, correct = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
        per_class = [k / s if s else None for k, s in zip(correct, support)]
        present = [a for a in per_class if a is not None]
        n = labels.numel()
        return EvalResult(
            num_classes=c, class_names=names, count=n,
            top1=int((pred == labels).sum()) / n if n else None,
            top5=int((topk == labels[:, None]).any(dim=1).sum()) / n if n else None,
            top5_k=self.k, per_class_accuracy=per_class, per_class_support=support, per_class_correct=correct,
            mean_class_accuracy=sum(present) / len(present) if present else None,
            confusion=confusion, invalid=sorted(self._invalid))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _json_text(doc: dict) -> str:
    """One top-level key per line, and one item per line in per_class / confusion: a 710-class
    matrix stays small and readable."""
    def dump(value: object) -> str:
        return json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))

    parts = []
    for key, value in doc.items():
        if key in ("per_class", "confusion"):
            items = ",\n  ".join(json.dumps(v, separators=(",", ":")) if key == "confusion" else dump(v)
                                  for v in value)
            parts.append(f'{dump(key)}: [\n  {items}\n ]')
        else:
            parts.append(f"{dump(key)}: {dump(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _most_confused(r: EvalResult, limit: int = 10) -> list[tuple[int, int, int]]:
    """(true, predicted, videos) of the largest off-diagonal cells; ties in class order (stable output)."""
    cells = [(t, p, int(r.confusion[t, p])) for t, p in r.confusion.nonzero().tolist() if t != p]
    return sorted(cells, key=lambda x: (-x[2], x[0], x[1]))[:limit]


def _markdown(r: EvalResult, title: str, extra: dict, png: str | None) -> str:
    k = f"top-{r.top5_k}"
    lines = [f"# {title}", "",
             f"| videos scored | top-1 | {k} | mean class accuracy | invalid videos |",
             "|---:|---:|---:|---:|---:|",
             f"| {r.count:,} | {_pct(r.top1)} | {_pct(r.top5)} | {_pct(r.mean_class_accuracy)} | {len(r.invalid):,} |",
             ""]
    if r.top5_k < TOP_K:
        lines += [f"Top-5 is top-{r.top5_k} here: there are only {r.num_classes} classes.", ""]
    lines += [f"- {key}: {value}" for key, value in extra.items()] + ([""] if extra else [])
    if r.invalid:
        shown = ", ".join(map(str, r.invalid[:SHOWN_INVALID]))
        more = f", ... (all {len(r.invalid)} in eval.json)" if len(r.invalid) > SHOWN_INVALID else ""
        lines += [f"Videos that could not be decoded, not scored: {len(r.invalid)} (indices {shown}{more}).", ""]
    else:
        lines += ["Every video decoded: none left out.", ""]
    rows = list(range(r.num_classes))
    if r.num_classes <= PER_CLASS_TABLE_MAX:
        lines += ["## Per class", ""]
    else:
        rows = sorted((i for i in rows if r.per_class_support[i]), key=lambda i: r.per_class_accuracy[i])[:10]
        lines += ["## Weakest classes", "", f"The 10 lowest of {r.num_classes} classes; all are in eval.json.", ""]
    lines += ["| id | class | videos | correct | accuracy |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {i} | {_cell(r.class_names[i])} | {r.per_class_support[i]} | {r.per_class_correct[i]} | "
              f"{_pct(r.per_class_accuracy[i])} |" for i in rows]
    confused = _most_confused(r)
    if confused:
        lines += ["", "## Most confused", "", "| true class | predicted as | videos | share of the true class |",
                  "|---|---|---:|---:|"]
        lines += [f"| {_cell(r.class_names[t])} | {_cell(r.class_names[p])} | {n} | "
                  f"{_pct(n / r.per_class_support[t])} |" for t, p, n in confused]
    if png:
        lines += ["", f"Confusion matrix: [{png}]({png}) (rows: true class, columns: predicted class)."]
    return "\n".join(lines) + "\n"


def plot_confusion(r: EvalResult, path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix with class names on both axes; counts in the cells for few classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    c = r.num_classes
    side = min(20.0, 3.0 + 0.32 * c)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    counts = r.confusion.double()
    share = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    names = [n if len(n) <= 32 else n[:31] + "\u2026" for n in r.class_names]
    ax.set_xticks(range(c), labels=names, rotation=90, fontsize=8)
    ax.set_yticks(range(c), labels=names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\n{r.count} videos, top-1 {_pct(r.top1)}", fontsize=10)
    if c <= CELL_COUNTS_MAX:
        for t in range(c):
            for p in range(c):
                ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=8,
                        color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's videos")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def write_report(result: EvalResult, out_dir: str | Path, title: str, extra: dict | None = None) -> dict[str, Path]:
    """eval.json (everything), eval.md (for a person) and, for <= 50 classes, confusion.png. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    paths: dict[str, Path] = {}
    if result.num_classes <= PER_CLASS_TABLE_MAX:
        paths["png"] = plot_confusion(result, out / "confusion.png", title)
    paths["json"] = out / "eval.json"
    paths["json"].write_text(_json_text({"title": title, **result.to_json(), "extra": extra}), encoding="utf-8")
    paths["md"] = out / "eval.md"
    png = paths["png"].name if "png" in paths else None
    paths["md"].write_text(_markdown(result, title, extra, png), encoding="utf-8")
    return paths
