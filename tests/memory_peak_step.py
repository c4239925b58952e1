"""Oracle script for test_memory_peak: one rank pair builds a real DeepSpeed engine for each ZeRO stage in turn,
runs training steps, and measures the peak of one whole step (forward, backward, optimizer) with torch's memory
profiler, which sees every tensor allocation on the CPU, persistent or temporary. Next to it: the estimate of
vmae_ds.memory for the same run, computed before the engine was built.

    deepspeed --num_gpus 2 tests/memory_peak_step.py CONFIG.yaml OUT.json
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.profiler import ProfilerActivity, profile

from vmae_ds.engine.data_source import endless
from vmae_ds.engine.ds_setup import build_engine, load_ds_json
from vmae_ds.engine.launch import init_process_group
from vmae_ds.engine.run_config import load_run_config
from vmae_ds.engine.trainer import prepare, seed_everything
from vmae_ds.memory.plan import plan
from vmae_ds.objectives import make_objective

BUCKET = 2_000_000  # small buckets: the per-parameter terms, not DeepSpeed's fixed buffers, decide the peak


def live_bytes() -> int:
    """Bytes of every tensor storage Python can reach now (weights, ZeRO's flat buffers and partitions, AdamW
    moments, the batches), each storage once."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def measured_peak(prof: profile, start: int) -> int:
    """`start` plus the highest point of the profiler's allocation / free events (in time order)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return start + peak


def main(config: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group(on_cpu=True)
    timeline = bool(os.environ.get("VMAE_MEMORY_TIMELINE"))  # developers: where the peak is, by category
    result = {}
    for stage, ckpt in ((2, "full"), (3, "none")):
        ds_json = load_ds_json(f"ds_configs/zero{stage}.json")
        zo = ds_json["zero_optimization"]
        zo.update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
        if stage == 3:
            zo.update(stage3_prefetch_bucket_size=BUCKET, stage3_max_live_parameters=BUCKET)
        path = Path(out).with_name(f"zero{stage}.json")
        if rank == 0:
            path.write_text(json.dumps(ds_json))
        dist.barrier()
        cfg = load_run_config(config, [f"deepspeed_config={path}", f"activation_checkpointing.mode={ckpt}"])
        objective = make_objective(cfg)
        loader = objective.build_loader(rank, world)
        _, ds = prepare(cfg, loader)
        est = plan(cfg, ds, world, type(objective), 1 << 40, "test", 0.0, fused_adam=False)
        engine, _ = build_engine(cfg, ds, objective)
        objective.setup(engine.device)
        seed_everything(cfg.seed + rank)
        stream = endless(loader)
        batch = objective.to_device(next(stream))
        for i in range(3):  # the first steps allocate what persists (moments, buffers); the third is measured
            following = objective.to_device(next(stream))  # the prefetched batch, alive as in the engine's loop
            if i == 2:
                loader._cache.clear()  # the synthetic source's host copies of its clips are not the step's memory
                gc.collect()
                start = live_bytes()
                prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=timeline,
                               with_stack=timeline)
                prof.__enter__()
            loss, _ = objective.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            del loss
            batch = following
        prof.__exit__(None, None, None)
        if timeline:
            from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline
            _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
            top = max(sizes, key=sum)
            names = ["?"] + [str(c).split(".")[-1] for c in sorted(_CATEGORY_TO_INDEX, key=_CATEGORY_TO_INDEX.get)]
            print(f"rank {rank} zero{stage} peak {sum(top)}: " + ", ".join(f"{n} {b}" for n, b in zip(names, top)))
        result[f"zero{stage}"] = {"ckpt": ckpt, "measured": measured_peak(prof, start), "start": start,
                                  "estimate": est.peak,
                                  "states_backward": est.states.backward, "states_step": est.states.step,
                                  "saved_per_sample": est.profile.saved(est.choice.ckpt),
                                  "micro_batch": est.micro_batch}
        engine.destroy()
        del engine, batch, following, prof
        gc.collect()
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
