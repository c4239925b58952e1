"""Oracle script for test_zero_checks: after real backward passes under ZeRO-1/2/3, our fused gradient checks
(vmae_ds.engine.zero_checks) must give DeepSpeed's own overflow flag and gradient norm, bit for bit, on clean
gradients, on gradients holding inf / NaN, and on huge but finite ones. It also counts device synchronizes
over those four steps.

    deepspeed --num_gpus 2 tests/zero_checks_step.py CONFIG.yaml OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from vmae_ds.engine.data_source import endless
from vmae_ds.engine.ds_setup import build_engine
from vmae_ds.engine.launch import init_process_group
from vmae_ds.engine.run_config import load_run_config
from vmae_ds.engine.trainer import prepare, seed_everything
from vmae_ds.objectives import make_objective


def both(opt) -> dict:
    """(ours, DeepSpeed's) overflow flags (this rank's, then agreed over the ranks) and norms on the optimizer's
    current gradients. ZeRO-3 keeps DeepSpeed's overflow test (on its flat buffer): its flags are DeepSpeed's."""
    stage3 = isinstance(opt, DeepSpeedZeroOptimizer_Stage3)
    cls = DeepSpeedZeroOptimizer_Stage3 if stage3 else DeepSpeedZeroOptimizer
    if stage3:
        flag = opt.has_overflow()
        local, flags = [False, False], [flag, flag]
        groups = [(opt.averaged_gradients[i], opt.fp16_groups[i]) for i in range(len(opt.fp16_groups))]
    else:
        local = [bool(opt.has_overflow_partitioned_grads_serial().item()),
                 bool(cls.has_overflow_partitioned_grads_serial(opt).item())]
        ours_flag = opt.has_overflow()
        fused = opt.__dict__.pop("has_overflow_partitioned_grads_serial")
        ds_flag = opt.has_overflow()  # DeepSpeed's agreement around its own per-tensor test
        opt.has_overflow_partitioned_grads_serial = fused
        flags = [ours_flag, ds_flag]
        groups = [(opt.averaged_gradients[i], opt.params_in_partition[i]) for i in range(len(opt.bit16_groups))]
    ours_norm = [opt.get_grad_norm_direct(g, p).item() for g, p in groups]
    ds_norm = [cls.get_grad_norm_direct(opt, g, p).item() for g, p in groups]
    return {"local": local, "flag": flags, "norm": [ours_norm, ds_norm]}


def count_synchronize():
    """Count the accelerator's device synchronizes from now on (DeepSpeed's throughput timer makes one at
    every forward and step unless it is off); call the result to stop counting and get the count."""
    from deepspeed.accelerator import get_accelerator

    acc, calls = get_accelerator(), [0]
    real = acc.synchronize

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    acc.synchronize = counted

    def stop() -> int:
        acc.synchronize = real
        return calls[0]
    return stop


def main(config: str, out: str) -> None:
    cfg = load_run_config(config)
    objective = make_objective(cfg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    loader = objective.build_loader(rank, world)
    _, ds = prepare(cfg, loader)
    init_process_group(on_cpu=True)
    engine, _ = build_engine(cfg, ds, objective)
    objective.setup(engine.device)
    opt = engine.optimizer
    installed = "get_grad_norm_direct" in vars(opt)  # zero_checks.install sets it on the instance
    seed_everything(cfg.seed + rank)
    stream = endless(loader)
    syncs = count_synchronize()
    cases = {}
    for case in ("clean", "inf", "nan", "huge"):
        loss, _ = objective.loss(engine, objective.to_device(next(stream)))
        engine.backward(loss)  # ZeRO reduces into the partitions here; the step reads averaged_gradients
        grads = [g for g in opt.averaged_gradients[0] if g is not None and g.numel() > 1]
        if rank == 1 and case != "clean":  # one rank only: the all-reduces must carry it to the other
            g = grads[len(grads) // 2].view(-1)
            g[1] = {"inf": float("inf"), "nan": float("nan"), "huge": 1e15}[case]  # its square still fits the fp32 sum
        cases[case] = both(opt)
        engine.step()
    syncs = syncs()
    if rank == 0:
        Path(out).write_text(json.dumps({"installed": installed, "cases": cases, "synchronize_calls": syncs,
                                         "optimizer": type(opt).__name__}))
    dist.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
