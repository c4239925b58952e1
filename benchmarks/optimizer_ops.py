"""How many torch ops one `engine.step()` issues, with our fused ZeRO gradient checks and with DeepSpeed's
per-tensor ones (`speed.fused_grad_checks`). On a GPU each op that touches data is a kernel launched after
DeepSpeed has read the overflow flag back, i.e. while the device waits, so the count is what the optimizer
phase costs in launches; on this CPU it is exact, where a GPU timing would not be available.

    DS_ACCELERATOR=cpu python -m benchmarks.optimizer_ops            # ViT-g's 40 + 4 blocks at debug width
    DS_ACCELERATOR=cpu python -m benchmarks.optimizer_ops --stage 1 --depth 12 --decoder-depth 4   # ViT-B's

The model is the debug one with the block counts given: the number of gradient tensors, which is what the
per-tensor checks scale with, is that of the real model; their widths do not change the op count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# ops that launch no kernel: metadata (DeepSpeed's per-parameter `p.data = view` after the update) and
# allocations (ZeRO-3 parks every released parameter on `torch.empty(0)`)
METADATA_OPS = {"aten::view", "aten::narrow", "aten::_has_compatible_shallow_copy_type", "aten::as_strided",
                "aten::alias", "aten::detach", "aten::slice", "aten::lift_fresh", "aten::empty", "aten::view_as",
                "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze",
                "aten::_unsafe_view", "aten::select", "aten::split", "aten::unbind", "aten::chunk"}


def profiled(fn: Callable[[], Any]) -> tuple[Any, list, list[str]]:
    """fn()'s result, its top-level aten ops (not called from another aten op), and the names of those that
    touch data."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return result, top, [e.name for e in top if e.name not in METADATA_OPS]


def count_step(engine, objective, stream, steps: int) -> dict:
    """Whole training steps: the median host milliseconds of `steps` unprofiled `engine.step()` calls, then one
    step profiled phase by phase (forward + loss, backward, optimizer step)."""
    host_ms = []
    for _ in range(steps):
        loss, _ = objective.loss(engine, objective.to_device(next(stream)))
        engine.backward(loss)
        t0 = time.perf_counter()
        engine.step()
        host_ms.append((time.perf_counter() - t0) * 1e3)
    batch = objective.to_device(next(stream))
    (loss, _), _, forward = profiled(lambda: objective.loss(engine, batch))
    _, _, backward = profiled(lambda: engine.backward(loss))
    _, top, data = profiled(engine.step)
    return {"ops": len(top), "data_ops": len(data), "host_ms": statistics.median(host_ms) if host_ms else 0.0,
            "top_data_ops": Counter(data).most_common(5),
            "phases": {"forward + loss": len(forward), "backward": len(backward), "optimizer step": len(data)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.optimizer_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=40, help="encoder blocks (default 40, ViT-g)")
    p.add_argument("--decoder-depth", type=int, default=4, help="decoder blocks (default 4)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=2, help="ZeRO stage (default 2; under 3 only "
                   "the norm is ours, its overflow test already runs on the flat buffer)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (then one profiled), after 3 "
                   "warm-up steps")
    a = p.parse_args(argv)

    from vmae_ds.engine.data_source import endless
    from vmae_ds.engine.ds_setup import build_engine
    from vmae_ds.engine.launch import init_process_group, single_process_env
    from vmae_ds.engine.run_config import load_run_config
    from vmae_ds.engine.trainer import prepare
    from vmae_ds.engine.zero_checks import install
    from vmae_ds.objectives import make_objective

    single_process_env()
    cfg = load_run_config(ROOT / "configs" / "pretrain" / "debug_cpu.yaml", [
        f"model.depth={a.depth}", f"model.decoder_depth={a.decoder_depth}", "activation_checkpointing.mode=none",
        f"deepspeed_config={ROOT / 'ds_configs' / f'zero{a.stage}.json'}", "speed.fused_grad_checks=false"])
    objective = make_objective(cfg)
    loader = objective.build_loader(0, 1)
    _, ds = prepare(cfg, loader)
    from deepspeed.accelerator import get_accelerator

    init_process_group(on_cpu=get_accelerator().device_name() == "cpu")
    engine, _ = build_engine(cfg, ds, objective)
    objective.setup(engine.device)
    stream = endless(loader)
    for _ in range(2):  # warm-up: buffers allocated, AdamW state created
        engine.backward(objective.loss(engine, objective.to_device(next(stream)))[0])
        engine.step()
    theirs = count_step(engine, objective, stream, a.steps)
    install(engine.optimizer)
    ours = count_step(engine, objective, stream, a.steps)
    grads = sum(1 for q in engine.module.parameters() if q.requires_grad)
    print(f"ZeRO-{a.stage}, {a.depth} + {a.decoder_depth} blocks, {grads} gradient tensors; one engine.step() (ops: "
          f"one profiled step; host ms: median of {a.steps}):")
    print("| gradient checks | top-level torch ops | of them touching data | host ms (this CPU) |")
    print("|---|---|---|---|")
    for label, r in (("DeepSpeed's, per tensor", theirs), ("fused (vmae_ds.engine.zero_checks)", ours)):
        print(f"| {label} | {r['ops']} | {r['data_ops']} | {r['host_ms']:.1f} |")
    print(f"most frequent data ops, DeepSpeed's: {theirs['top_data_ops']}")
    print(f"most frequent data ops, fused: {ours['top_data_ops']}")
    phases = ours["phases"]
    print("whole training step with the fused checks, data-touching ops per phase: "
          + ", ".join(f"{k} {v}" for k, v in phases.items()) + f"; {sum(phases.values())} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
