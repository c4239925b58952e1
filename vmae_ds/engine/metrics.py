"""Rank-0 metrics: progress line, JSONL, TensorBoard; MFU against a peak-FLOPs table."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from .storage_report import storage_line

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, no sparsity). The NVL and PCIe
# cards run at lower clocks and power than the SXM modules of the same name.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,  # SXM
    "H100_NVL": 835e12,
    "H100_PCIE": 756e12,
    "H200": 989e12,  # SXM
    "H200_NVL": 835e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def device_key(name: str) -> str | None:
    """Key into PEAK_BF16_FLOPS for a CUDA device name (as torch.cuda.get_device_name gives it)."""
    name = name.upper()
    for family in ("GH200", "H200", "H100", "B200", "A100", "L40S"):
        if family in name:
            for variant in ("NVL", "PCIE"):
                if variant in name and f"{family}_{variant}" in PEAK_BF16_FLOPS:
                    return f"{family}_{variant}"
            return family
    return None


def detect_device_name() -> str | None:
    """Key into PEAK_BF16_FLOPS for the current GPU, or None (CPU / unknown: MFU is reported as n/a)."""
    if not torch.cuda.is_available():
        return None
    return device_key(torch.cuda.get_device_name())


def peak_memory_gib() -> tuple[float, float | None, str]:
    """(peak GiB, peak reserved GiB or None, what was measured): on GPU the CUDA allocator's peak of
    allocated tensors and of the memory it holds from the driver (reserved: what other processes cannot
    use, fragmentation included); on CPU the process max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30, "cuda"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20, None, "rss"


class MetricsWriter:
    """Writes on rank 0 only; other ranks get a no-op writer."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step > 0 and self.path.exists():
            self._truncate_after(resume_step)
        self.file = open(self.path, "a" if resume_step > 0 else "w")  # a fresh start begins a fresh file
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after the checkpoint we resume from: the file reads as one run."""
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def record(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
            probe = rec.get("probe")
            if isinstance(probe, dict):  # the in-run probe's accuracy at the step it ran
                for k in ("top1", "top5", "mean_class_accuracy", "seconds"):
                    if isinstance(probe.get(k), (int, float)):
                        self.tb.add_scalar(f"probe/{k}", probe[k], rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def progress_line(rec: dict, total_steps: int) -> str:
    mfu = "n/a" if rec.get("mfu") is None else f"{rec['mfu'] * 100:.1f}%"
    if rec.get("mfu_with_teacher") is not None:
        mfu += f" ({rec['mfu_with_teacher'] * 100:.1f}% with teacher)"
    gn = "n/a" if rec.get("grad_norm") is None else f"{rec['grad_norm']:.3f}"
    mem = f"{rec['peak_mem_gib']:.2f} GiB"
    if rec.get("peak_reserved_gib") is not None:
        mem += f" (reserved {rec['peak_reserved_gib']:.2f})"
    else:
        mem += f" ({rec['mem_kind']})"
    extra = "".join(f" | {k} {v:.4g}" for k, v in rec.get("objective", {}).items())
    loader = f" | loader mem {rec['loader_mem_gib']:.2f} GiB" if rec.get("loader_mem_gib") is not None else ""
    if rec.get("step_split"):  # shares of the step time (the progress line's are window averages)
        loader += " | split " + " ".join(f"{k} {v * 100:.0f}%" for k, v in rec["step_split"].items())
    probe = rec.get("probe")
    if probe and probe.get("top1") is not None:  # the newest in-run probe, with the step it ran at
        loader += f" | probe {probe['kind']} top-1 {probe['top1']:.3f} @ step {probe['step']}"
    return (f"step {rec['step']}/{total_steps} ep {rec['epoch']} | loss {rec['loss']:.4f}{extra} | "
            f"lr {rec['lr']:.3e} | grad norm {gn} | {rec['clips_per_s']:.1f} clips/s | MFU {mfu} | peak mem {mem} | "
            f"data wait {rec['data_wait'] * 100:.0f}%{loader} | non-finite skipped {rec['nonfinite_total']}"
            + data_problems(rec))


def data_problems(rec: dict) -> str:
    """Skipped clips in the progress line: the count, and the names of those that crashed or hung a decoder."""
    if "data_skipped" not in rec:
        return ""
    out = f" | corrupt clips skipped {rec['data_skipped']}"
    for kind in ("crashed", "hung"):
        names = rec.get(f"data_{kind}") or []
        if names:
            shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
            out += f" | decoder {kind} on {len(names)}: {shown}"
    return out + storage_line(rec)


def say(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)
