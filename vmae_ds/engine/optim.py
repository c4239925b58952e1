"""Recipe arithmetic: derived batch/lr values, AdamW parameter groups, per-iteration cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from .run_config import OptimConfig

NO_DECAY_NAMES = ("mask_token", "pos_embed", "cls_token")


@dataclass(frozen=True)
class Derived:
    """What the recipe turns into on this cluster (printed at start, stored with the run)."""

    world_size: int
    global_batch: int  # videos per optimizer step, before num_sample (the authors' lr rule counts these)
    samples_per_step: int  # clips actually processed per optimizer step (after num_sample)
    micro_batch_per_gpu: int  # samples per GPU per micro-step: what DeepSpeed calls micro batch
    lr: float
    min_lr: float
    warmup_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def lines(self, base_lr: float) -> list[str]:
        return [f"world size {self.world_size}, global batch {self.global_batch} videos "
                f"({self.samples_per_step} samples/step after num_sample, micro batch {self.micro_batch_per_gpu}/GPU)",
                f"base lr {base_lr:.3g} -> actual lr {self.lr:.4g} (= base * {self.global_batch} / 256), "
                f"min lr {self.min_lr:.3g}, warmup lr {self.warmup_lr:.3g}",
                f"steps per epoch {self.steps_per_epoch}, total steps {self.total_steps}, "
                f"warmup steps {self.warmup_steps}"]


def derive(opt: OptimConfig, *, world_size: int, num_sample: int, batches_per_epoch: int) -> Derived:
    """batches_per_epoch: micro-batches one rank draws per pass over the data."""
    global_batch = opt.batch_size * world_size * opt.grad_accum
    scale = global_batch / 256
    spe = opt.steps_per_epoch or max(1, batches_per_epoch // opt.grad_accum)
    total = opt.epochs * spe
    return Derived(world_size=world_size, global_batch=global_batch,
                   samples_per_step=global_batch * num_sample, micro_batch_per_gpu=opt.batch_size * num_sample,
                   lr=opt.base_lr * scale, min_lr=opt.min_lr * scale, warmup_lr=opt.warmup_lr * scale,
                   steps_per_epoch=spe, total_steps=total, warmup_steps=min(total, int(opt.warmup_epochs * spe)))


def lr_at(step: int, d: Derived) -> float:
    """lr for optimizer step `step` (0-based): linear warmup warmup_lr -> lr, then cosine lr -> min_lr.

    The same values as the authors' `cosine_scheduler` array (warmup linspace includes both ends).
    """
    step = min(step, d.total_steps - 1)
    if step < d.warmup_steps:
        if d.warmup_steps == 1:
            return d.lr
        return d.warmup_lr + (d.lr - d.warmup_lr) * step / (d.warmup_steps - 1)
    span = d.total_steps - d.warmup_steps
    return d.min_lr + 0.5 * (d.lr - d.min_lr) * (1 + math.cos(math.pi * (step - d.warmup_steps) / span))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices, none for norms, biases, mask token and position tables.

    Uses `ds_shape` when present: under ZeRO-3 `zero.Init` a partitioned parameter's `.shape` is (0,).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        if len(shape) <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
