"""vmae-bench: what dual masking buys over encoder-only masking, per attention kernel and checkpointing.

For each model size and each cell of {encoder-only, dual} x {math, sdpa, flash_attn} x {checkpointing off, on}
it runs real training steps (forward, loss, backward, AdamW) and reports step time, FLOPs, TFLOP/s, MFU,
exact saved-activation bytes, peak memory and the largest micro-batch (GPU), then the encoder-only / dual
ratios next to the VideoMAE V2 paper's 1.79x (B) / 1.48x (g). Sizes too big for the machine are
"computed" at full size on fake tensors (FLOPs, saved bytes). A DeepSpeed ZeRO-3 bf16 step is run too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from vmae_ds.models import ALIASES, MODELS

from .presets import PRESETS

SIZES = list(ALIASES)  # S B L H g debug


def _count(minimum: int):
    """argparse type: an int >= minimum (a 0 batch or 0 steps used to run nothing or crash late)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _ds_row(text: str) -> tuple[str, int]:
    """argparse type for --ds SIZE:BATCH (BATCH defaults to 1)."""
    size, _, batch = text.partition(":")
    if size not in SIZES and size not in MODELS:
        raise argparse.ArgumentTypeError(f"size {size!r} is not one of {', '.join(SIZES)} (as in g:8)")
    return size, _count(1)(batch) if batch else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmae-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  vmae-bench --preset cpu --out reports/bench          # what `make bench` runs\n"
               "  vmae-bench --preset gpu --out reports/h100           # every size on a GPU\n"
               "  vmae-bench --preset cpu --models B --kernels sdpa --ckpt off --steps 5 --out /tmp/b\n"
               "Read the reports with benchmarks/README.md.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named plan (default: gpu with CUDA, else cpu). Flags below override its fields.")
    p.add_argument("--out", default="reports/bench", help="folder for the JSON, Markdown and PNG (default %(default)s)")
    p.add_argument("--models", nargs="+", choices=SIZES, help="sizes to time for real (replaces the preset's)")
    p.add_argument("--batch", type=_count(1), help="micro-batch for every timed size (default: the preset's per size)")
    p.add_argument("--frames", type=_count(1), help="frames for timed sizes (default 16; fewer runs faster, not exact)")
    p.add_argument("--compute", nargs="*", choices=SIZES,
                   help="sizes computed at full size on fake tensors (FLOPs, saved bytes); give none to skip")
    p.add_argument("--kernels", nargs="+", choices=["math", "sdpa", "flash_attn"],
                   help="attention kernels (unavailable ones are skipped and noted)")
    p.add_argument("--ckpt", nargs="+", choices=["off", "on"], help="activation checkpointing settings")
    p.add_argument("--warmup", type=_count(0), help="untimed steps per cell before timing")
    p.add_argument("--steps", type=_count(1), help="timed steps per cell (the report gives their median)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 autocast (default; also on CPU) or plain fp32")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--threads", type=_count(1),
                   help="torch CPU threads (default: the preset's; cpu uses 1 for steady timings on shared machines)")
    p.add_argument("--ds", type=_ds_row, metavar="SIZE:BATCH",
                   help="DeepSpeed ZeRO-3 row, e.g. g:8 (default: the preset's)")
    p.add_argument("--no-ds", action="store_true", help="skip the DeepSpeed row")
    p.add_argument("--search-max-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="search the largest micro-batch per cell (CUDA only; slow)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (known GPUs are looked up; CPUs are not)")
    p.add_argument("--memory-budget-gib", type=float,
                   help="budget for computed max-batch estimates (default: the GPU's memory, else 80 = H100)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _preset(args: argparse.Namespace, device: torch.device):
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    measure = dict(preset.measure)
    if args.models:
        measure = {m: measure.get(m, (1, None)) for m in args.models}
    if args.batch or args.frames:
        measure = {m: (args.batch or b, args.frames or f) for m, (b, f) in measure.items()}
    ds = preset.ds
    if args.ds:
        ds = args.ds
    fields = {"measure": measure, "ds": None if args.no_ds else ds}
    for name in ("compute", "kernels", "ckpt", "warmup", "steps", "search_max_batch", "threads"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = tuple(value) if isinstance(value, list) else value
    return replace(preset, **fields)


def _notes(preset, suite, device: torch.device, amp) -> list[str]:
    notes = []
    skipped = [k for k in preset.kernels if k not in suite.kernels]
    if skipped:
        notes.append(f"kernels not available here, skipped: {', '.join(skipped)} (flash_attn needs CUDA + flash-attn)")
    if device.type != "cuda":
        notes.append("no CUDA: peak memory and the max-batch search are GPU-only; saved-activation bytes are "
                     "measured exactly here and max batches are computed estimates")
        notes.append(f"CPU autocast: {'bf16' if amp else 'off (fp32)'}; cells of one size and kernel are timed "
                     "interleaved (encoder-only, dual, encoder-only, ...) so a busy shared CPU hits both alike")
    if device.type == "cpu":
        notes.append(f"torch CPU threads: {torch.get_num_threads()} (set with --threads)")
    if suite.peak is None:
        notes.append("MFU needs the device's peak FLOP/s (--peak-tflops): not reported")
    reduced = [m for m, (_, f) in preset.measure.items() if f]
    if reduced:
        notes.append(f"timed at reduced frames (not the paper's 16): {', '.join(reduced)}")
    return notes


def _command(argv: Sequence[str] | None) -> str:
    """The command line as typed: `python -m benchmarks ...` or `vmae-bench ...`."""
    if argv is not None:
        return shlex.join(["vmae-bench", *argv])
    prog = os.path.basename(sys.argv[0])
    prog = "python -m benchmarks" if prog == "__main__.py" else prog
    return " ".join([prog, shlex.join(sys.argv[1:])])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (leave --device out, or use cpu)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    from .analysis import ratio_rows, speed_rows
    from .report import environment, summary, write_report
    from .step import Cell
    from .suite import Suite

    preset = _preset(args, device)
    from vmae_ds.models import get_spec

    for size, (_, frames) in preset.measure.items():  # e.g. an odd --frames: say so before any step runs
        try:
            get_spec(size, **({"num_frames": frames} if frames else {}))
        except ValueError as e:
            parser.error(f"--frames {frames} does not fit {size}: {e}")
    try:  # before any step: an unwritable --out used to fail only after the whole run
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot create the report folder ({e.strerror or e})")
    threads = args.threads or (preset.threads if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    budget = (args.memory_budget_gib or (torch.cuda.get_device_properties(device).total_memory / 2**30
                                         if device.type == "cuda" else 80.0)) * 2**30
    suite = Suite(preset, device, amp, args.peak_tflops, budget)
    command = _command(argv)
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=suite.total_steps(), desc="vmae-bench", unit="group", disable=args.quiet) as bar:
        partial = Path(args.out) / "partial.json"

        def save_partial(rows: list[dict]) -> None:
            partial.write_text(json.dumps({"measured": rows, "ratios": ratio_rows(rows)}, indent=1, default=str))

        cells = suite.run(bar, on_pair=save_partial)
        ds = None
        if preset.ds:
            bar.set_postfix_str(f"deepspeed {preset.ds[0]}")
            from .ds_step import run_ds_step
            ds_cell = Cell(preset.ds[0], "dual", suite.kernels[-1], "off", preset.ds[1])
            ds = run_ds_step(ds_cell, device, preset.warmup, preset.steps)
            flops = suite.flops(ds_cell)["analytic"]["train_flops_per_clip"]
            ds.update(tflops=flops * ds["clips_per_s"] / 1e12,
                      mfu=flops * ds["clips_per_s"] / 1e12 / suite.peak if suite.peak else None)
            bar.update(1)
    result = {"preset": args.preset or ("gpu" if device.type == "cuda" else "cpu"),
              "preset_description": preset.description, "env": environment(device, command),
              "models": list(dict.fromkeys([*preset.measure, *preset.compute])),
              "precision": "bf16 autocast" if amp else "fp32", "warmup": preset.warmup, "steps": preset.steps,
              "timing": "CUDA events" if device.type == "cuda" else "perf_counter, interleaved",
              "budget_bytes": budget, "peak_tflops": suite.peak, **cells,
              "ratios": ratio_rows(cells["measured"] + cells["computed"]), "speed": speed_rows(cells["measured"]),
              "deepspeed": ds, "notes": _notes(preset, suite, device, amp),
              "wall_s": time.perf_counter() - t0}
    paths = write_report(result, args.out)
    partial.unlink(missing_ok=True)  # the full report replaces it
    print(summary(result))
    print(f"\nwall time {result['wall_s']:.0f} s; report: {paths['md']} (+ .json, .png)")
    return 0
