"""Multi-view evaluation: clips x crops per video, softmax averaged over the views, each video once.

Every rank scores its share of the videos (EvalLoader gives every rank the same number of batches, so a
ZeRO-3 forward's collectives line up); the per-rank results are gathered on rank 0, where a repeated video
index is an error rather than a double count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.transforms import normalize_on_device, pixel_stats
from .report import EvalAccumulator, EvalResult, write_report


@dataclass
class Predictions:
    """Per-video top-5 class ids (best first) and label, by video index: what agreement checks compare."""

    top: dict[int, list[int]] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        with open(path, "w") as f:
            for i in sorted(self.top):
                f.write(json.dumps({"index": i, "key": self.keys.get(i), "label": self.labels[i],
                                    "pred": self.top[i][0], "top5": self.top[i]}) + "\n")
        return path


def read_predictions(path: str | Path) -> dict[int, int]:
    """index -> top-1 class from a predictions.jsonl written by `evaluate`."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[int(rec["index"])] = int(rec["pred"])
    return out


def agreement(a: dict[int, int], b: dict[int, int]) -> tuple[float, int]:
    """Share of the videos scored by both whose top-1 classes agree, and how many were compared."""
    common = sorted(set(a) & set(b))
    if not common:
        return 0.0, 0
    return sum(a[i] == b[i] for i in common) / len(common), len(common)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Any, num_classes: int,
             device: torch.device, dtype: torch.dtype, rank: int, world: int, *, chunk: int = 0,
             progress: bool = True, group: Any = None) -> tuple[EvalResult | None, Predictions | None]:
    """Score every video of `loader` (an EvalLoader). Returns (result, predictions) on rank 0, (None, None)
    elsewhere. `chunk`: most clips per forward (0 = a whole batch of videos x views at once)."""
    stats = pixel_stats(device)
    acc, preds = EvalAccumulator(num_classes), Predictions()
    bar = tqdm(total=len(loader), desc="eval", unit="batch", disable=not progress or rank != 0, leave=False)
    for batch in loader:
        video = batch["video"]  # (B, V, 3, T, S, S) uint8
        b, v = video.shape[:2]
        flat = video.flatten(0, 1)
        step = chunk or flat.shape[0]
        logits = torch.cat([forward(normalize_on_device(flat[i:i + step].to(device, non_blocking=True), dtype, stats))
                            .float() for i in range(0, flat.shape[0], step)])
        probs = logits.softmax(dim=-1).view(b, v, -1).mean(dim=1).cpu()
        acc.add(batch["index"], probs, batch["label"], batch["valid"])
        top = probs.topk(min(5, num_classes), dim=1).indices
        keys = batch.get("keys") or [None] * b
        for j in range(b):
            i = int(batch["index"][j])
            if i >= 0 and bool(batch["valid"][j]):
                preds.top[i], preds.labels[i] = top[j].tolist(), int(batch["label"][j])
                if keys[j] is not None:
                    preds.keys[i] = keys[j]
        bar.update(1)
    bar.close()
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (acc, preds), group=group)
        if rank != 0:
            return None, None
        acc, preds = gathered[0]
        for other_acc, other_preds in gathered[1:]:
            acc.merge(other_acc)
            preds.top.update(other_preds.top)
            preds.labels.update(other_preds.labels)
            preds.keys.update(other_preds.keys)
    return acc.result(), preds


def report(result: EvalResult, preds: Predictions, out_dir: str | Path, title: str, extra: dict,
           class_names: list[str] | None = None) -> tuple[dict[str, Path], str]:
    """Write eval.json / eval.md / confusion.png / predictions.jsonl; returns (paths, a one-line summary)."""
    if class_names is not None and len(class_names) == result.num_classes:
        result.class_names = list(class_names)
    paths = write_report(result, out_dir, title, extra)
    paths["predictions"] = preds.write(Path(out_dir) / "predictions.jsonl")
    line = summary(result, extra) + f" -> {paths['md']}"
    return paths, line


def summary(result: EvalResult, extra: dict) -> str:
    views = f" ({extra['views']})" if "views" in extra else ""
    top1 = "n/a" if result.top1 is None else f"{result.top1:.4f}"
    top5 = "n/a" if result.top5 is None else f"{result.top5:.4f}"
    bad = f", {len(result.invalid)} undecodable" if result.invalid else ""
    return f"eval: top-1 {top1}, top-{result.top5_k} {top5} over {result.count} videos{views}{bad}"
