"""The training step as it was before the host-sync-free rewrite, kept as the test oracle of
test_engine_sync_free: boolean-mask indexing in the model (`x[~mask]`, `pos[kept]`), constants built per call,
and a `loss.item()` + all-reduce before every backward to skip a non-finite batch on every rank.

    deepspeed --num_gpus 2 tests/reference_step.py CONFIG.yaml OUT.json
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

from vmae_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vmae_ds.engine.data_source import endless
from vmae_ds.engine.ds_setup import build_engine
from vmae_ds.engine.launch import init_process_group
from vmae_ds.engine.optim import lr_at
from vmae_ds.engine.run_config import load_run_config
from vmae_ds.engine.trainer import prepare, seed_everything
from vmae_ds.losses import patchify
from vmae_ds.models.vit import _run_blocks
from vmae_ds.objectives import make_objective


def old_normalize(video_uint8: torch.Tensor) -> torch.Tensor:
    dev = video_uint8.device
    mean = torch.tensor(IMAGENET_MEAN, device=dev, dtype=torch.float32).view(1, 3, 1, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=dev, dtype=torch.float32).view(1, 3, 1, 1, 1) * 255
    return (video_uint8.float() - mean) / std


def old_target(video: torch.Tensor, p: int, t: int) -> torch.Tensor:
    v = video.float()
    m = torch.tensor(IMAGENET_MEAN, device=v.device).view(1, -1, 1, 1, 1)
    s = torch.tensor(IMAGENET_STD, device=v.device).view(1, -1, 1, 1, 1)
    patches = patchify(v * s + m, p, t)
    normed = (patches - patches.mean(dim=-2, keepdim=True)) / (patches.var(dim=-2, unbiased=True,
                                                                             keepdim=True).sqrt() + 1e-6)
    return normed.flatten(2)


def old_forward(self, video, encoder_mask, decoder_mask=None):
    enc = self.encoder
    b, n = encoder_mask.shape
    if enc.embed_visible_only:  # the model's own arithmetic (a matmul over the visible tubelets), old-style ids
        ids = torch.arange(n, device=video.device).expand(b, n)[~encoder_mask].reshape(b, -1)
        x = enc.patch_embed(video, ids)
        x = x + enc.pos_embed.to(dtype=x.dtype).expand(b, -1, -1)[~encoder_mask].reshape(b, -1, x.shape[-1])
    else:
        x = enc.patch_embed(video)
        x = x + enc.pos_embed.to(dtype=x.dtype)
        x = x[~encoder_mask].reshape(b, -1, x.shape[-1])
    x, _ = _run_blocks(enc.blocks, x, enc.num_ckpt_blocks, enc.ckpt_fn)
    x_vis = self.encoder_to_decoder(enc.norm(x))
    b, _, c = x_vis.shape
    pos = self.decoder.pos_embed.to(dtype=x_vis.dtype).expand(b, -1, -1)
    kept = encoder_mask if decoder_mask is None else ~decoder_mask
    pos_vis = pos[~encoder_mask].reshape(b, -1, c)
    pos_kept = pos[kept].reshape(b, -1, c)
    x = torch.cat([x_vis + pos_vis, self.mask_token.to(x_vis.dtype) + pos_kept], dim=1)
    return self.decoder(x, pos_kept.shape[1])


def old_loss(pred, target, encoder_mask, decoder_mask):
    kept = encoder_mask if decoder_mask is None else ~decoder_mask
    b = target.shape[0]
    labels = target[kept].reshape(b, -1, target.shape[-1])
    weight = encoder_mask[kept].reshape(b, -1).float()
    per_token = (pred.float() - labels).pow(2).mean(dim=-1)
    return (per_token * weight).sum() / weight.sum()


def main(config: str, out: str) -> None:
    cfg = load_run_config(config)
    objective = make_objective(cfg)
    rank, world = int(__import__("os").environ["RANK"]), int(__import__("os").environ["WORLD_SIZE"])
    loader = objective.build_loader(rank, world)
    d, ds = prepare(cfg, loader)
    init_process_group(on_cpu=True)
    engine, _ = build_engine(cfg, ds, objective)
    engine.module.forward = types.MethodType(old_forward, engine.module)
    seed_everything(cfg.seed + rank)
    device, stream, nan = engine.device, endless(loader), set(cfg.debug.nan_batches)
    spec = cfg.model.spec()
    losses, step, batches = {}, 0, 0
    while step < cfg.optim.max_steps:
        lr = lr_at(step, d)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        got = []
        while len(got) < cfg.optim.grad_accum:
            batch = next(stream)
            video = old_normalize(batch["video"].to(device))
            enc, dec = batch["encoder_mask"].to(device), batch.get("decoder_mask")
            dec = dec.to(device) if dec is not None else None
            batches += 1
            target = old_target(video, spec.patch_size, spec.tubelet_size)
            loss = old_loss(engine(video.to(torch.float32), enc, dec), target, enc, dec)
            if batches in nan and rank == 0:
                loss = loss * float("nan")
            probe = torch.tensor([loss.item()], dtype=torch.float64, device=device)
            dist.all_reduce(probe)
            if not torch.isfinite(probe[0]):
                continue
            engine.backward(loss)
            engine.step()
            got.append(probe[0].item() / world)
        step += 1
        losses[step] = sum(got) / len(got)
    if rank == 0:
        Path(out).write_text(json.dumps(losses))
    dist.barrier()


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*argv)
