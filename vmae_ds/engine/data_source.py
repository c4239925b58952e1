"""Epoch length of a run's loader, and an endless walk over it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..config import ConfigError
from .run_config import RunConfig


def batches_per_epoch(cfg: RunConfig, loader: Any, world: int) -> int:
    """Micro-batches one rank draws per epoch (the authors' epoch: every video once, before num_sample)."""
    try:
        return len(loader)
    except TypeError:  # resampled shards stream forever: count the clips in the shard index instead
        pass
    from ..data.shards import config_shards
    counts = config_shards(cfg.shards_config()).counts
    if counts is None:
        if cfg.optim.steps_per_epoch:
            return cfg.optim.steps_per_epoch * cfg.optim.grad_accum
        raise ConfigError("cannot count the clips in data.shards.shards (no index.json): set optim.steps_per_epoch")
    return max(1, sum(counts) // (world * cfg.optim.batch_size))


def endless(loader: Any) -> Iterator[dict]:
    """Batches forever; an exact-epoch loader is simply iterated again (its state carries the position)."""
    while True:
        yield from loader
