"""Rank-0 metrics: progress line, JSONL, TensorBoard; MFU against a peak-FLOPs table."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,  # SXM; the PCIe card is 756e12: pass logging.device_name=H100_PCIE
    "H100_PCIE": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def detect_device_name() -> str | None:
    """Key into PEAK_BF16_FLOPS for the current GPU, or None (CPU / unknown: MFU is reported as n/a)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    if "H100" in name and "PCIE" in name:
        return "H100_PCIE"
    return next((k for k in ("H200", "H100", "A100", "L40S") if k in name), None)


def peak_memory_gib() -> tuple[float, str]:
    """(peak GiB, what was measured): CUDA allocator peak on GPU, process max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20, "rss"


def model_flops_per_clip(cfg: Any) -> float:
    """fwd+bwd FLOPs per clip from vmae_ds.flops (recompute not counted)."""
    from ..flops import train_step_flops

    spec = cfg.model.spec()
    m = cfg.masks
    return float(train_step_flops(spec, decoder_mode=m.decoder, encoder_ratio=m.encoder_ratio,
                                  decoder_ratio=m.decoder_ratio).total)


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

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def progress_line(rec: dict, total_steps: int) -> str:
    mfu = "n/a" if rec.get("mfu") is None else f"{rec['mfu'] * 100:.1f}%"
    gn = "n/a" if rec.get("grad_norm") is None else f"{rec['grad_norm']:.3f}"
    return (f"step {rec['step']}/{total_steps} ep {rec['epoch']} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
            f"grad norm {gn} | {rec['clips_per_s']:.1f} clips/s | MFU {mfu} | "
            f"peak mem {rec['peak_mem_gib']:.2f} GiB ({rec['mem_kind']}) | data wait {rec['data_wait'] * 100:.0f}% | "
            f"non-finite skipped {rec['nonfinite_total']}"
            + (f" | corrupt clips skipped {rec['data_skipped']}" if "data_skipped" in rec else ""))


def say(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)
