"""Script for test_umt: UMT at real widths (ViT-B student width 768 at depth 2, the full CLIP ViT-B/16 teacher
with random weights, 2 frames of 224) built the way the engine builds it (zero.Init, ZeRO-3, bf16) on 2 ranks:
the first step's loss against the same student and batch without DeepSpeed.

    deepspeed --num_gpus 2 tests/umt_step.py TEACHER.pt OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from vmae_ds.engine.ds_setup import build_engine, load_ds_json, resolve_ds_config
from vmae_ds.engine.launch import init_process_group
from vmae_ds.engine.optim import derive
from vmae_ds.engine.run_config import RunConfig
from vmae_ds.objectives.umt import UMTObjective

ROOT = Path(__file__).resolve().parents[1]


def main(teacher: str, out: str) -> None:
    init_process_group(on_cpu=True)
    rank = torch.distributed.get_rank()
    cfg = RunConfig.model_validate({
        "objective": "umt", "precision": "bf16", "deepspeed_config": str(ROOT / "ds_configs" / "zero3.json"),
        "model": {"name": "vit_base_patch16", "attention": "sdpa", "depth": 2, "num_frames": 2, "tubelet_size": 1},
        "umt": {"teacher": {"name": "clip_b16", "path": teacher}, "align_layers": 2},
        "data": {"kind": "synthetic", "num_sample": 1}, "optim": {"batch_size": 1}})
    d = derive(cfg.optim, world_size=2, num_sample=1, batches_per_epoch=10)
    ds = resolve_ds_config(cfg, d, load_ds_json(cfg.deepspeed_config))
    objective = UMTObjective(cfg)
    engine, _ = build_engine(cfg, ds, objective)
    objective.setup(engine.device)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        full = {k: v.detach().float().clone() for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (1, 3, 2, 224, 224), dtype=torch.uint8, generator=g)
    batch = objective.to_device({"video": video})
    torch.manual_seed(123)  # the attention-mask draw
    loss, _ = objective.loss(engine, batch)
    plain = objective.build_model()
    plain.load_state_dict(full, strict=True)
    plain = plain.to(torch.bfloat16)
    torch.manual_seed(123)
    ref, _ = objective.loss(plain, batch)
    engine.backward(loss)
    engine.step()
    if rank == 0:
        Path(out).write_text(json.dumps({"loss": float(loss.detach()), "ref_loss": float(ref.detach()),
                                         "applied": not engine.optimizer.overflow,
                                         "teacher_flops": objective.flops_per_sample()["teacher"]}))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*argv)
