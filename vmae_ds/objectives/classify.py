"""Supervised post-pretraining and fine-tuning: a classifier on labelled clips (facts section 6).

Recipe pieces, each a named setting of `finetune`: initial weights from our exports, official VideoMAE / V2
checkpoints or HF VideoMAE (position tables adapted), a head sliced from another label set (K710 -> K400),
layer-wise lr decay, drop path, random resized crop + flip (not for SSv2-like sources) + video RandAugment in
the loader, then on the device random erasing and Mixup / CutMix with label smoothing, and timm's
SoftTargetCrossEntropy. The final multi-view evaluation runs when `finetune.eval.shards` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError
from ..data.augment import FinetuneClipTransform, SoftTargetCrossEntropy, VideoMixup, VideoRandomErasing, check_labels
from ..data.transforms import normalize_on_device, pixel_stats
from ..engine.layer_decay import layer_decay_param_groups
from ..models import create_classifier
from .base import Objective
from .mae import loader_extras


class FinetuneTransform:
    """The loader's per-clip transform (picklable): FinetuneClipTransform, never flipping the sources whose
    labels depend on left and right (Something-Something)."""

    def __init__(self, clip: FinetuneClipTransform, no_flip_sources: list[str]):
        self.clip, self.no_flip = clip, set(no_flip_sources)

    def __call__(self, frames: torch.Tensor, gen: torch.Generator, meta: dict) -> list[torch.Tensor]:
        return self.clip(frames, gen, flip_allowed=str(meta.get("source", "")) not in self.no_flip)


class ClassifyObjective(Objective):
    name = "classify"
    job = "finetune"
    plans_memory = True

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.ft = cfg.finetune
        self.has_initial_weights = self.ft.init is not None

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        return create_classifier(self.cfg.model.name, self.ft.num_classes, head_drop_rate=self.ft.head_drop_rate,
                                 **self.classifier_overrides())

    def classifier_overrides(self) -> dict:
        return {k: v for k, v in self.cfg.model.overrides().items()
                if k not in ("decoder_depth", "decoder_dim", "decoder_heads")}

    def initial_weights(self, model: nn.Module) -> list[str]:
        from ..models.init_weights import load_classifier_init

        return load_classifier_init(model, self.ft.init, self.ft.init_head_map, self.ft.init_fresh_head)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return layer_decay_param_groups(model, self.cfg.optim.weight_decay, self.ft.layer_decay)

    def setup(self, device: torch.device) -> list[str]:
        super().setup(device)
        self.stats = pixel_stats(device)
        ft = self.ft
        self.mixup = VideoMixup(ft.num_classes, mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix,
                                switch_prob=ft.mixup_switch_prob, label_smoothing=ft.label_smoothing)
        self.erasing = VideoRandomErasing(probability=ft.reprob) if ft.reprob > 0 else None
        self.criterion = SoftTargetCrossEntropy()
        if ft.ema.enabled:
            raise ConfigError("finetune.ema is not available yet in this version (see README: EMA)")
        return []

    # ---------------------------------------------------------------- data
    def build_loader(self, rank: int, world: int) -> Any:
        cfg = self.cfg
        spec = cfg.model.spec()
        if cfg.data.kind == "synthetic":
            from ..engine.synthetic import SyntheticLoader

            s = cfg.data.synthetic
            if s.num_classes > self.ft.num_classes:
                raise ConfigError(f"data.synthetic.num_classes {s.num_classes} exceeds finetune.num_classes "
                                  f"{self.ft.num_classes}")
            return SyntheticLoader.for_run(cfg, rank, world, frames=spec.num_frames, size=spec.img_size, grid=None,
                                           masks=None, num_classes=s.num_classes)
        from ..data import build_finetune_loader

        shards = cfg.shards_config()
        ft = self.ft
        clip = FinetuneClipTransform(input_size=shards.input_size, scale=ft.scale, flip=ft.flip,
                                     randaug=ft.randaug, num_sample=shards.num_sample)
        return build_finetune_loader(shards, batch_size=cfg.optim.batch_size * cfg.data.num_sample, rank=rank,
                                     world_size=world, seed=cfg.seed,
                                     transform=FinetuneTransform(clip, ft.no_flip_sources), **loader_extras(cfg))

    def to_device(self, batch: dict) -> dict:
        check_labels(batch["label"], self.ft.num_classes)  # on the host: no device read-back in the step
        video = batch["video"].to(self.device, non_blocking=True)
        return {"video": normalize_on_device(video, torch.float32, self.stats),
                "label": batch["label"].to(self.device, non_blocking=True)}

    # ---------------------------------------------------------------- step
    def augment(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Random erasing then Mixup / CutMix (timm's order: erasing belongs to the sample, mixing to the batch);
        drawn here, at consumption, so the checkpointed RNG state reproduces them."""
        video = batch["video"]
        if self.erasing is not None:
            video = self.erasing(video)
        return self.mixup(video, batch["label"])

    def loss(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video, target = self.augment(batch)
        logits = model(video.to(self.dtype)).float()
        # against the dominant class of the (mixed) target: a training-time signal, not the evaluation
        acc = (logits.argmax(dim=-1) == target.argmax(dim=-1)).float().mean()
        return self.criterion(logits, target), {"acc": acc}

    def flops_per_sample(self) -> dict[str, float]:
        from ..flops import classifier_flops

        return {"model": 3.0 * classifier_flops(self.cfg.model.spec(), self.ft.num_classes).total}

    # ---------------------------------------------------------------- end of training
    def finish(self, engine: Any, run_dir: Path, rank: int, world: int) -> list[str]:
        ev = self.ft.eval
        if ev.shards is None:
            return []
        from ..eval.run import evaluate, report

        loader = self.eval_loader(rank, world)
        engine.eval()
        result, preds = evaluate(lambda x: engine(x), loader, self.ft.num_classes, self.device, self.dtype, rank,
                                 world, progress=False)
        engine.train()
        if rank != 0:
            return []
        extra = {"weights": str(run_dir), "views": f"{ev.num_clips} clips x {ev.num_crops} crops",
                 "shards": ev.shards}
        _, line = report(result, preds, run_dir / "eval", f"{self.cfg.name}: held-out evaluation", extra,
                         class_names_of(ev.shards))
        return [line]

    def eval_loader(self, rank: int, world: int) -> Any:
        from ..data import EvalLoader

        ev = self.ft.eval
        base = self.cfg.shards_config().model_dump() if self.cfg.data.kind == "shards" else {}
        spec = self.cfg.model.spec()
        shards = eval_data_config(base, ev.shards, ev.num_workers, spec.num_frames, spec.img_size)
        return EvalLoader(shards, batch_size=ev.batch_size, rank=rank, world_size=world, num_clips=ev.num_clips,
                          num_crops=ev.num_crops)


def eval_data_config(base: dict, shards: str, workers: int, num_frames: int, img_size: int) -> Any:
    """The DataConfig for evaluation shards: the training sampling (stride per source, backend) and remote
    read settings where given."""
    from ..data import DataConfig

    keep = {k: base[k] for k in ("sampling_rate", "source_sampling_rate", "backend", "read_timeout_s", "read_retries",
                                 "retry_backoff_s", "remote_commands", "cache_dir", "cache_gib") if k in base}
    return DataConfig(shards=shards, num_frames=num_frames, input_size=img_size, num_workers=workers, **keep)


def class_names_of(shards: str | None) -> list[str] | None:
    """Class names stored with labelled shards (labels.json next to index.json), if any."""
    if not shards:
        return None
    from ..data.remote import Remote, fetch, is_remote

    try:
        if is_remote(shards):  # next to a remote index.json: one try (most sets have no labels.json)
            folder = shards.rsplit("/", 1)[0] if shards.endswith(".json") else shards.rstrip("/")
            text = fetch(f"{folder}/labels.json", Remote(retries=0))
        else:
            folder = Path(shards).parent if shards.endswith(".json") else Path(shards)
            if not (folder / "labels.json").is_file():
                return None
            text = (folder / "labels.json").read_bytes()
        return list(json.loads(text)["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
