"""Probe reports in vmae-eval's style: per probe kind eval.json / eval.md / confusion.png (top-1, top-5, per
class), a probe.json / probe.md summary over the kinds, and for a training run a plot of the in-run probe's
accuracy next to the loss over steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..eval.report import EvalAccumulator, EvalResult, write_report
from .features import FeatureSet


def score(scores: Tensor, val: FeatureSet, num_classes: int, class_names: list[str] | None = None) -> EvalResult:
    """Top-1 / top-5 / per class of `scores` (n_val, C) for the val set; its unreadable clips are listed as
    invalid (not scored), as vmae-eval lists undecodable videos."""
    acc = EvalAccumulator(num_classes)
    if len(val):
        acc.add(val.index, scores, val.labels, torch.ones(len(val), dtype=torch.bool))
    if val.skipped_index:
        k = len(val.skipped_index)
        acc.add(torch.tensor(val.skipped_index), torch.zeros(k, num_classes), torch.full((k,), -1),
                torch.zeros(k, dtype=torch.bool))
    return acc.result(class_names if class_names is not None and len(class_names) == num_classes else None)


def write_probe_reports(results: dict[str, EvalResult], out: Path, title: str, extra: dict,
                        settings: dict[str, str]) -> Path:
    """<out>/<kind>/eval.* per probe, and <out>/probe.json + probe.md over all; returns probe.md."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, r in results.items():
        write_report(r, out / kind, f"{title}: {kind} probe", {**extra, "probe": settings.get(kind, kind)})
        rows.append({"probe": kind, "settings": settings.get(kind, ""), "top1": r.top1, "top5": r.top5,
                     "top5_k": r.top5_k, "mean_class_accuracy": r.mean_class_accuracy, "count": r.count,
                     "invalid_count": len(r.invalid), "report": f"{kind}/eval.md"})
    (out / "probe.json").write_text(json.dumps({"title": title, "probes": rows, "extra": extra}, indent=1) + "\n")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = [f"# {title}", "", "| probe | top-1 | top-k | mean class accuracy | val videos | settings | report |",
             "|---|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r['probe']} | {pct(r['top1'])} | {pct(r['top5'])} (k={r['top5_k']}) | "
              f"{pct(r['mean_class_accuracy'])} | {r['count']} | {r['settings']} | [{r['report']}]({r['report']}) |"
              for r in rows]
    lines += [""] + [f"- {k}: {v}" for k, v in extra.items()]
    md = out / "probe.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def plot_history(metrics_path: Path, png: Path, title: str) -> Path | None:
    """Training loss and in-run probe top-1 over steps, from a run's metrics.jsonl (records with 'probe')."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    steps, losses, probe_steps, top1 = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if isinstance(rec.get("probe"), dict) and rec["probe"].get("top1") is not None:
            probe_steps.append(rec["step"])
            top1.append(rec["probe"]["top1"])
    if not probe_steps:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:gray", lw=1, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax2 = ax.twinx()
    ax2.plot(probe_steps, top1, "o-", color="tab:blue", label="probe top-1")
    ax2.set_ylabel("probe top-1 (val)")
    ax2.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    fig.legend(loc="upper center", ncols=2, fontsize=8, bbox_to_anchor=(0.5, 0.93))
    fig.savefig(png, dpi=100)
    return png
