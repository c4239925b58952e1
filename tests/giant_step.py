"""Script for test_engine_giant: a ViT-g-shaped model built the way the engine builds it (zero.Init, ZeRO-3,
bf16) on 2 ranks, checked against the same model and batch without DeepSpeed.

    deepspeed --num_gpus 2 tests/giant_step.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from vmae_ds.engine.ds_setup import build_engine, load_ds_json, resolve_ds_config
from vmae_ds.engine.launch import init_process_group
from vmae_ds.engine.optim import derive
from vmae_ds.engine.run_config import RunConfig
from vmae_ds.masking import make_masks
from vmae_ds.models import create_pretrain_model
from vmae_ds.models.pos_embed import sinusoid_table
from vmae_ds.objectives.mae import MAEObjective

ROOT = Path(__file__).resolve().parents[1]


def main(out: str) -> None:
    init_process_group(on_cpu=True)
    rank = torch.distributed.get_rank()
    # ViT-g's widths, heads, patch and token count (16 x 224 / 14 -> 2048 tokens) at depth 1
    cfg = RunConfig.model_validate({
        "precision": "bf16", "deepspeed_config": str(ROOT / "ds_configs" / "zero3.json"),
        "model": {"name": "vit_giant_patch14", "attention": "sdpa", "depth": 1, "decoder_depth": 1},
        "data": {"kind": "synthetic", "num_sample": 1}, "optim": {"batch_size": 1, "clip_grad": 0.02}})
    d = derive(cfg.optim, world_size=2, num_sample=1, batches_per_epoch=10)
    ds = resolve_ds_config(cfg, d, load_ds_json(cfg.deepspeed_config))
    objective = MAEObjective(cfg)
    engine, _ = build_engine(cfg, ds, objective)
    objective.setup(engine.device)
    model = engine.module
    result: dict = {"grid": list(model.grid), "tokens": model.encoder.num_tokens}

    # 1. the position tables as the engine holds them (bf16 after DeepSpeed's cast) against the exact table
    for part in ("encoder", "decoder"):
        buf = getattr(model, part).pos_embed
        exact = sinusoid_table(buf.shape[1], buf.shape[2])
        result[f"{part}_pos_dtype"] = str(buf.dtype)
        result[f"{part}_pos_distinct_rows"] = int(torch.unique(buf[0].float(), dim=0).shape[0])
        result[f"{part}_pos_max_err_vs_bf16_exact"] = float((buf.float() - exact.to(buf.dtype).float()).abs().max())

    # 2. the initialisation survived partitioning (every init goes through Module.apply)
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        full = {k: v.detach().float().clone() for k, v in params.items()}
    e2d = full["encoder_to_decoder.weight"]
    result["e2d_max_over_default_bound"] = float(e2d.abs().max() / e2d.shape[1] ** -0.5)
    fc1 = full["decoder.blocks.0.mlp.fc1.weight"]
    result["decoder_fc1_max_over_xavier_bound"] = float(fc1.abs().max() / (6 / sum(fc1.shape)) ** 0.5)
    result["mask_token_absmax"] = float(full["mask_token"].abs().max())

    # 3. one training step: the same batch through the engine and through a plain bf16 copy of the model
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (1, 3, 16, 224, 224), dtype=torch.uint8, generator=g)
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 1, objective.grid(), generator=g)
    batch = objective.to_device({"video": video, "encoder_mask": enc, "decoder_mask": dec})
    loss, _ = objective.loss(engine, batch)
    engine.backward(loss)

    plain = create_pretrain_model("vit_giant_patch14", attention="sdpa", depth=1, decoder_depth=1)
    plain.load_state_dict(full, strict=True)
    plain = plain.to(torch.bfloat16)
    ref_loss, _ = objective.loss(plain, batch)
    ref_loss.backward()
    result["loss"], result["ref_loss"] = float(loss), float(ref_loss)
    cos = {}
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.mlp.fc2.weight", "decoder.head.weight",
                 "encoder.patch_embed.proj.weight", "mask_token"):
        a = safe_get_full_grad(params[name]).float().flatten()  # averaged over the 2 ranks' identical batches
        b = dict(plain.named_parameters())[name].grad.float().flatten()
        cos[name] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    result["grad_cosine"] = cos
    engine.step()
    result["step_applied"] = not engine.optimizer.overflow
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(argv[0])
