"""The whole training step under the DeepSpeed engine: ZeRO-3, bf16, one process.

On a GPU this is the ViT-g row of the report; on a CPU it runs the same code path (gloo, DeepSpeed's CPU
accelerator) on a small model, so the engine is exercised everywhere. Launch-free: a single rank sets
its own rendezvous variables when no launcher did.
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch

from vmae_ds.losses import pixel_target, reconstruction_loss

from .step import Cell, build_model, make_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_single_rank(backend: str) -> None:
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def ds_config(micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
        "gradient_clipping": 0.02,  # the ViT-g recipe's clip
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }


def run_ds_step(cell: Cell, device: torch.device, warmup: int, steps: int) -> dict:
    """Median step time of engine.forward/backward/step for `cell` (bf16 weights, ZeRO-3 partitions)."""
    import deepspeed

    _init_single_rank("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = build_model(cell, device)
    # A client AdamW: DeepSpeed's fused/CPU Adam would need a CUDA or C++ build on this machine.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(cell.batch))
    video, enc, dec = make_batch(model, cell, cell.batch, device)
    video = video.to(torch.bfloat16)

    def step() -> float:
        target = pixel_target(video, model.patch_size, model.tubelet_size)  # inside the step, as in step.py
        loss = reconstruction_loss(engine(video, enc, dec), target, enc, dec)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()  # float(loss) synchronises the device
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"cell": cell.to_dict(), "zero_stage": engine.zero_optimization_stage(),
           "precision": "bf16 weights (DeepSpeed)" if engine.bfloat16_enabled() else "fp32",
           "world_size": torch.distributed.get_world_size(), "step_times_s": times, "step_time_s": med,
           "time_per_clip_s": med / cell.batch, "clips_per_s": cell.batch / med,
           "deepspeed": deepspeed.__version__, "kernel_used": model.kernel.used}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    engine.destroy()
    return out
