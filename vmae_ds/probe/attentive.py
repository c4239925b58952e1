"""Attentive probe (as V-JEPA evaluates frozen video encoders): learned queries cross-attend to the frozen
tokens, a residual MLP, then a linear head; trained on cached tokens with the engine's AdamW parameter groups
and its per-iteration warmup + cosine schedule (vmae_ds.engine.optim), seeded by its own generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..engine.optim import derive, lr_at, param_groups
from ..engine.run_config import OptimConfig
from .scoring import ProbeError


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_queries: int = 1, num_heads: int | None = None):
        super().__init__()
        heads = num_heads or (dim // 64 if dim % 64 == 0 else 1)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, D) -> logits (B, C)."""
        kv = self.norm(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        x = x + self.mlp(self.mlp_norm(x))
        return self.head(self.out_norm(x).mean(dim=1))


@dataclass
class AttentiveSettings:
    epochs: int = 20
    batch_size: int = 64
    base_lr: float = 4e-3  # lr = base_lr x batch / 256, the engine's rule: 1e-3 at batch 64
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    seed: int = 0
    # a small probe set gives few steps an epoch (240 clips at batch 64: 80 steps in 20 epochs, which leaves
    # even random-init tokens at chance); the epochs grow until the schedule has at least this many steps
    min_steps: int = 400

    def epochs_for(self, n: int) -> int:
        """Epochs run over n training clips: `epochs`, or more to reach `min_steps`."""
        per_epoch = math.ceil(n / min(self.batch_size, n))
        return max(self.epochs, math.ceil(self.min_steps / per_epoch))


def train_attentive(tokens: Tensor, labels: Tensor, num_classes: int, settings: AttentiveSettings,
                    device: torch.device | str = "cpu") -> tuple[AttentiveProbe, list[float]]:
    """Fit an AttentiveProbe on (n, N, D) frozen tokens; returns it (eval mode) and the mean loss per epoch
    (`settings.epochs_for(n)` epochs)."""
    if tokens.dim() != 3 or labels.shape != (tokens.shape[0],) or tokens.shape[0] == 0:
        raise ProbeError(f"attentive probe needs (n, N, D) tokens and n labels, got {tuple(tokens.shape)} and "
                         f"{tuple(labels.shape)}")
    s = settings
    epochs = s.epochs_for(tokens.shape[0])
    gen = torch.Generator().manual_seed(s.seed)
    with torch.random.fork_rng(devices=[]):  # the probe's init draws from its own seed, not the caller's stream
        torch.manual_seed(s.seed)
        model = AttentiveProbe(tokens.shape[2], num_classes).to(device)
    n = tokens.shape[0]
    bs = min(s.batch_size, n)
    opt_cfg = OptimConfig(batch_size=bs, base_lr=s.base_lr, weight_decay=s.weight_decay, epochs=epochs,
                          warmup_epochs=min(s.warmup_epochs, epochs))
    d = derive(opt_cfg, world_size=1, num_sample=1, batches_per_epoch=math.ceil(n / bs))
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=d.lr, betas=opt_cfg.betas, eps=opt_cfg.eps)
    y = labels.long()
    history, step = [], 0
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for i in range(0, n, bs):
                idx = order[i:i + bs]
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, d)
                loss = F.cross_entropy(model(tokens[idx].to(device, torch.float32)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
            history.append(total / seen)
    return model.eval(), history


@torch.no_grad()
def attentive_scores(model: AttentiveProbe, tokens: Tensor, batch_size: int = 64,
                     device: torch.device | str = "cpu") -> Tensor:
    out = [model(tokens[i:i + batch_size].to(device, torch.float32)).softmax(dim=1).float().cpu()
           for i in range(0, tokens.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.head.out_features)
