"""Exponential moving average of the weights (the authors' `--model_ema`, timm's ModelEma), under ZeRO-1/2/3.

Started from the weights at the first step; after every applied optimizer step
ema = decay x ema + (1 - decay) x weights, where the weights are the ones the model computes with (bf16 or
fp32; the authors average their fp16 working weights into an fp32 copy the same way).

Kept in fp32 and sharded: all parameters, flattened and concatenated in `named_parameters` order, are cut
into `world` equal chunks and rank r averages chunk r only (4 bytes x parameters / world per rank). Under
ZeRO-1/2 every rank holds the weights whole and reads its chunk in place; under ZeRO-3 the parameters are
gathered once per update, a group of them at a time. The chunks travel in each rank's checkpoint file
(the objective's state), so a resume continues the average exactly; `full_weights` (collective) and
`read_ema_weights` (from a checkpoint folder, no process group) reassemble the whole model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

GATHER_ELEMENTS = 1 << 26  # ZeRO-3: parameters gathered together per update, at most this many elements


class ShardedEMA:
    """This rank's chunk of the fp32 average; `pieces` maps it onto the parameters (index, start, end, offset)."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], decay: float, rank: int, world: int,
                 device: torch.device | str = "cpu"):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.names, self.shapes, self.decay, self.rank, self.world = list(names), [tuple(s) for s in shapes], \
            decay, rank, world
        numels = [math.prod(s) for s in self.shapes]
        self.total = sum(numels)
        self.chunk = -(-self.total // world)
        lo, hi = min(rank * self.chunk, self.total), min((rank + 1) * self.chunk, self.total)
        self.pieces: list[tuple[int, int, int, int]] = []
        pos = 0
        for i, n in enumerate(numels):
            a, b = max(lo - pos, 0), min(hi - pos, n)
            if a < b:
                self.pieces.append((i, a, b, pos + a - lo))
            pos += n
        self.shadow = torch.zeros(self.chunk, dtype=torch.float32, device=device)  # padded: equal for gathers
        self.started = False
        self.updates = 0  # steps averaged in since the start

    def _views(self) -> list[torch.Tensor]:
        return [self.shadow[off:off + b - a] for _, a, b, off in self.pieces]

    def fold(self, params: dict[int, torch.Tensor], start: bool = False) -> None:
        """Average in the current weights: `params` maps parameter index -> its full tensor (any dtype), for
        at least the parameters of this rank's pieces that are not yet folded in this update."""
        pieces = [(k, piece) for k, piece in enumerate(self.pieces) if piece[0] in params]
        views = self._views()
        dst = [views[k] for k, _ in pieces]
        src = [params[i].detach().reshape(-1)[a:b] for _, (i, a, b, _) in pieces]
        if not dst:
            return
        if start:
            torch._foreach_copy_(dst, src)
        else:
            torch._foreach_add_(dst, src, alpha=1.0 - self.decay)  # after `decay_all`: d x ema + (1 - d) x w

    def decay_all(self) -> None:
        self.shadow.mul_(self.decay)

    def start(self, module: torch.nn.Module, stage3: bool) -> None:
        """The average starts as `module`'s current weights (collective under ZeRO-3)."""
        self._read(module, stage3, start=True)
        self.started = True

    def update(self, module: torch.nn.Module, stage3: bool) -> None:
        """One step: fold in `module`'s current weights (collective under ZeRO-3: every rank must call it)."""
        if not self.started:
            raise RuntimeError("ShardedEMA.update before start")
        self.decay_all()
        self._read(module, stage3, start=False)
        self.updates += 1

    def _read(self, module: torch.nn.Module, stage3: bool, start: bool) -> None:
        params = [p for _, p in module.named_parameters()]
        if not stage3:
            self.fold({i: params[i] for i, *_ in self.pieces}, start)
            return
        import deepspeed

        for group in _groups(params):  # each parameter gathered once, a group at a time
            with deepspeed.zero.GatheredParameters([params[i] for i in group]):
                self.fold({i: params[i] for i in group}, start)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every rank's chunk gathered into named fp32 tensors on the host (collective)."""
        parts = [torch.empty_like(self.shadow) for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather(parts, self.shadow)
        else:
            parts = [self.shadow]
        return split_flat(torch.cat([p.cpu() for p in parts]), self.names, self.shapes)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.cpu().clone(), "names": self.names, "shapes": self.shapes,
                "world": self.world, "rank": self.rank, "decay": self.decay, "updates": self.updates,
                "started": self.started}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.names, self.shapes, self.world, self.rank)
        saved = (state["names"], [tuple(s) for s in state["shapes"]], state["world"], state["rank"])
        if saved != mine:
            raise ValueError(f"the checkpoint's EMA was kept for {len(saved[0])} parameters over {saved[2]} "
                             f"rank(s), rank {saved[3]}; this run has {len(mine[0])} over {mine[2]}, rank {mine[3]}")
        self.shadow.copy_(state["shadow"].to(self.shadow.device))
        self.updates, self.started = int(state["updates"]), bool(state["started"])


def _groups(params: list[torch.Tensor]) -> list[list[int]]:
    """Consecutive parameter indices, at most GATHER_ELEMENTS elements per group (a larger one alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(params):
        n = math.prod(getattr(p, "ds_shape", p.shape))
        if groups[-1] and size + n > GATHER_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def split_flat(flat: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for name, shape in zip(names, shapes):
        n = math.prod(shape)
        out[name] = flat[pos:pos + n].reshape(shape).clone()
        pos += n
    return out


def for_engine(engine: Any, decay: float) -> ShardedEMA:
    """A ShardedEMA over the engine's parameters, on its device, for this rank (data parallel over all ranks)."""
    named = list(engine.module.named_parameters())
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for _, p in named]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return ShardedEMA([n for n, _ in named], shapes, decay, rank, world, engine.device)


def read_ema_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA of a checkpoint folder as named fp32 tensors, from its rank files (no process group)."""
    files = sorted(Path(folder).glob("rank_*.pt"))
    states = [torch.load(f, weights_only=False, map_location="cpu").get("objective", {}).get("ema") for f in files]
    if not states or any(s is None for s in states):
        raise FileNotFoundError(f"{folder}: no EMA in its rank files (was the run trained with finetune.ema.enabled?)")
    if states[0]["world"] != len(states):
        raise FileNotFoundError(f"{folder}: the EMA was kept over {states[0]['world']} ranks, {len(states)} rank "
                                f"files are here")
    s0 = states[0]
    flat = torch.cat([s["shadow"] for s in sorted(states, key=lambda s: s["rank"])])
    return split_flat(flat, s0["names"], [tuple(x) for x in s0["shapes"]])
