"""VideoMAE / VideoMAE V2 pretraining: reconstruct normalised pixels of hidden tubelets (dual or encoder-only)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..data.transforms import normalize_on_device, pixel_stats
from ..flops import train_step_flops
from ..losses import channel_stats, pixel_target, reconstruction_loss
from ..masking import TokenGrid, select_tokens
from ..models import create_pretrain_model
from .base import Objective


class MAEObjective(Objective):
    name = "mae"
    job = "pretrain"
    plans_memory = True

    def build_model(self) -> nn.Module:
        return create_pretrain_model(self.cfg.model.name, **self.cfg.model.overrides())

    def setup(self, device: torch.device) -> list[str]:
        super().setup(device)
        self.spec = self.cfg.model.spec()
        self.input_stats = pixel_stats(device)
        self.target_stats = channel_stats(device)
        return []

    def grid(self) -> TokenGrid:
        s = self.cfg.model.spec()
        return TokenGrid(s.num_frames // s.tubelet_size, s.img_size // s.patch_size, s.img_size // s.patch_size)

    def build_loader(self, rank: int, world: int) -> Any:
        cfg, masks = self.cfg, self.cfg.masks.model_dump()
        spec = cfg.model.spec()
        if cfg.data.kind == "synthetic":
            from ..engine.synthetic import SyntheticLoader

            return SyntheticLoader.for_run(cfg, rank, world, frames=spec.num_frames, size=spec.img_size,
                                           grid=self.grid(), masks=masks)
        from ..data import build_pretrain_loader, default_mask_fn

        mask_fn = default_mask_fn(self.grid(), encoder_kind=masks["encoder"], encoder_ratio=masks["encoder_ratio"],
                                  decoder_kind=masks["decoder"], decoder_ratio=masks["decoder_ratio"])
        return build_pretrain_loader(cfg.shards_config(), batch_size=cfg.optim.batch_size * cfg.data.num_sample,
                                     rank=rank, world_size=world, seed=cfg.seed, mask_fn=mask_fn,
                                     **loader_extras(cfg))

    def to_device(self, batch: dict) -> dict:
        # masks become fixed-count index tensors here, on the CPU, so the step never waits for a count
        sel = select_tokens(batch["encoder_mask"], batch.get("decoder_mask"))
        video = batch["video"].to(self.device, non_blocking=True)  # uint8 over the bus, 4x fewer bytes
        return {"video": normalize_on_device(video, torch.float32, self.input_stats),
                "sel": sel.to(self.device, non_blocking=True)}

    def loss(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video, sel = batch["video"], batch["sel"]
        target = pixel_target(video, self.spec.patch_size, self.spec.tubelet_size, *self.target_stats)
        pred = model(video.to(self.dtype), sel)
        return reconstruction_loss(pred, target, sel), {}

    def probe_features(self, model: Any, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ..probe.features import encoder_features

        return encoder_features(model.encoder, video.to(self.dtype))

    def flops_per_sample(self) -> dict[str, float]:
        """fwd + bwd of one clip as the model runs it: the patch embedding of the visible tokens only (the
        model's embed_visible_only); the decoder MLP at its own width (its alignment padding is work on zeros,
        not counted, as recompute is not)."""
        m = self.cfg.masks
        return {"model": float(train_step_flops(self.cfg.model.spec(), decoder_mode=m.decoder,
                                                encoder_ratio=m.encoder_ratio, decoder_ratio=m.decoder_ratio,
                                                encoder_mask=m.encoder, embed_visible_only=True).total)}


def loader_extras(cfg: Any) -> dict:
    """Keyword arguments of the shard loaders that come from the run rather than data.shards: the clips this
    run has quarantined (a decoder crashed or hung on them; kept in the run folder, so no resume replays
    them, whatever checkpoint it starts from) and the test-only decoder faults."""
    from ..engine.quarantine import read_quarantine

    extras: dict = {}
    quarantine = read_quarantine(cfg.run_dir)
    if quarantine:
        extras["quarantine"] = quarantine
    if cfg.debug.decode_faults:
        extras["fault_keys"] = dict(cfg.debug.decode_faults)
    return extras
