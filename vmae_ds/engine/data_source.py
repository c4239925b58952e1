"""Where batches come from: the synthetic source or the `vmae_ds.data` shard loader, and epoch length."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..config import ConfigError
from ..masking import TokenGrid
from .run_config import RunConfig
from .synthetic import SyntheticLoader


def build_loader(cfg: RunConfig, rank: int, world: int) -> Any:
    spec = cfg.model.spec()
    grid = TokenGrid(spec.num_frames // spec.tubelet_size, spec.img_size // spec.patch_size,
                     spec.img_size // spec.patch_size)
    masks = cfg.masks.model_dump()
    if cfg.data.kind == "synthetic":
        s = cfg.data.synthetic
        return SyntheticLoader(num_videos=s.num_videos, seed=s.seed + cfg.seed, frames=spec.num_frames,
                               size=spec.img_size, grid=grid, batch_videos=cfg.optim.batch_size,
                               num_sample=cfg.data.num_sample, rank=rank, world_size=world, masks=masks)
    from ..data import build_pretrain_loader, default_mask_fn
    mask_fn = default_mask_fn(grid, encoder_kind=masks["encoder"], encoder_ratio=masks["encoder_ratio"],
                              decoder_kind=masks["decoder"], decoder_ratio=masks["decoder_ratio"])
    return build_pretrain_loader(cfg.shards_config(), batch_size=cfg.optim.batch_size * cfg.data.num_sample,
                                 rank=rank, world_size=world, seed=cfg.seed, mask_fn=mask_fn)


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
