"""Supervised post-pretraining and fine-tuning: a classifier on labelled clips (facts section 6).

Recipe pieces, each a named setting of `finetune`: initial weights from our exports, official VideoMAE / V2
checkpoints or HF VideoMAE (position tables adapted), a head sliced from another label set (K710 -> K400),
layer-wise lr decay, drop path, video RandAugment + random resized crop + flip (not for SSv2-like sources) in
the loader, then on the device random erasing and Mixup / CutMix with label smoothing, and timm's
SoftTargetCrossEntropy; the position table interpolated from the initial weights' grid; an optional EMA of the
weights (`finetune.ema`). The final multi-view evaluation runs when `finetune.eval.shards` is set, with the
training clips' sampling, for the model and its EMA.
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
from ..flops import classifier_flops
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
        self.pos_table: torch.Tensor | None = None  # set when it is not this grid's fresh sinusoid
        self.ema: Any = None  # ShardedEMA, made at the first step (it needs the engine)
        self.ema_state: dict | None = None  # restored before the engine's first step

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        model = create_classifier(self.cfg.model.name, self.ft.num_classes, head_drop_rate=self.ft.head_drop_rate,
                                  **self.classifier_overrides())
        self.pos_table = self.position_table(model.grid, model.dim)
        if self.pos_table is not None:
            model.pos_embed.copy_(self.pos_table)
        return model

    def classifier_overrides(self) -> dict:
        return {k: v for k, v in self.cfg.model.overrides().items()
                if k not in ("decoder_depth", "decoder_dim", "decoder_heads")}

    def position_table(self, grid: tuple[int, int, int], dim: int) -> torch.Tensor | None:
        """finetune.pos_embed=interpolate with initial weights trained at another grid: their table resampled
        to `grid`; None (the model's own fresh table) otherwise."""
        if self.ft.pos_embed != "interpolate" or self.ft.init is None:
            return None
        from ..models.init_weights import trained_grid
        from ..models.pos_embed import interpolated_table

        source = tuple(trained_grid(self.ft.init, self.cfg.model.name))
        return None if source == tuple(grid) else interpolated_table(source, grid, dim)

    def initial_weights(self, model: nn.Module) -> list[str]:
        from ..models.init_weights import load_classifier_init, trained_grid
        from ..models.pos_embed import sinusoid_table

        lines = load_classifier_init(model, self.ft.init, self.ft.init_head_map, self.ft.init_fresh_head)
        table = model.pos_embed.detach().cpu()
        ours = self.pos_table is not None and torch.equal(table, self.pos_table)
        if not ours and not torch.equal(table, sinusoid_table(table.shape[1], table.shape[2])):
            self.pos_table = table.clone()  # the file's own table (one of our exports of such a run)
            lines.append("position table: the initial weights' own")
        elif self.pos_table is not None:  # interpolated in build_model (a head reset rebuilds the fresh one)
            model.pos_embed.copy_(self.pos_table)
            lines.append(f"position table: {tuple(model.grid)} tokens, interpolated from the initial weights' grid "
                         f"{tuple(trained_grid(self.ft.init, self.cfg.model.name))} (finetune.pos_embed=interpolate)")
        return lines

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

        shards = finetune_data(cfg.shards_config())
        ft = self.ft
        clip = FinetuneClipTransform(input_size=shards.input_size, scale=ft.scale, flip=ft.flip,
                                     randaug=ft.randaug, num_sample=shards.num_sample,
                                     randaug_interpolation=ft.randaug_interpolation,
                                     randaug_first=ft.randaug_order == "before_crop", antialias=shards.antialias)
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
        self.start_ema(model)
        video, target = self.augment(batch)
        logits = model(video.to(self.dtype)).float()
        # against the dominant class of the (mixed) target: a training-time signal, not the evaluation
        acc = (logits.argmax(dim=-1) == target.argmax(dim=-1)).float().mean()
        return self.criterion(logits, target), {"acc": acc}

    def flops_per_sample(self) -> dict[str, float]:
        return {"model": 3.0 * classifier_flops(self.cfg.model.spec(), self.ft.num_classes).total}

    # ---------------------------------------------------------------- EMA and the objective's checkpoint state
    def start_ema(self, engine: Any) -> None:
        """At the first step (before its update): the EMA starts from the current weights, or from the
        checkpoint's average on a resume. Collective under ZeRO-3 (every rank is at the same batch)."""
        if not self.ft.ema.enabled or self.ema is not None:
            return
        from ..engine.ema import for_engine

        self.ema = for_engine(engine, self.ft.ema.decay)
        if self.ema_state is not None:
            self.ema.load_state_dict(self.ema_state)
            self.ema_state = None
            return
        if getattr(engine, "global_steps", 0) > 0 and self.ema.rank == 0:
            from ..engine.metrics import say

            say(f"EMA: no average in the checkpoint for this world size; it starts again from the weights at step "
                f"{engine.global_steps}")
        self.ema.start(engine.module, engine.zero_optimization_stage() == 3)

    def after_step(self, engine: Any, step: int) -> None:
        if self.ema is not None:
            self.ema.update(engine.module, engine.zero_optimization_stage() == 3)

    def state_dict(self) -> dict:
        out: dict = {}
        ema = self.ema.state_dict() if self.ema is not None else self.ema_state  # saved before the first step
        if ema is not None:
            out["ema"] = ema
        if self.pos_table is not None:
            out["pos_embed"] = self.pos_table.clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        if self.ft.ema.enabled:
            self.ema_state = state.get("ema")  # none: a checkpoint before the first step (start_ema says so later)

    # ---------------------------------------------------------------- end of training
    def finish(self, engine: Any, run_dir: Path, rank: int, world: int) -> list[str]:
        ev = self.ft.eval
        if ev.shards is None:
            return []
        lines = [self.evaluate_weights(lambda x: engine(x), engine, run_dir / "eval", "model", rank, world)]
        if self.ema is not None and self.ft.ema.eval:
            model = self.ema_model(engine)
            lines.append(self.evaluate_weights(model, None, run_dir / "eval_ema", "EMA", rank, world))
            del model
        return [line for line in lines if line]

    def evaluate_weights(self, forward: Any, engine: Any, out: Path, which: str, rank: int, world: int) -> str:
        """Score `forward` (the engine's model, or the EMA's plain copy) on finetune.eval; rank 0's line."""
        from ..eval.run import evaluate, report

        ev = self.ft.eval
        loader = self.eval_loader(rank, world)
        if engine is not None:
            engine.eval()
        result, preds = evaluate(forward, loader, self.ft.num_classes, self.device, self.dtype, rank, world,
                                 progress=False)
        if engine is not None:
            engine.train()
        if rank != 0:
            return ""
        label = f"EMA (decay {self.ft.ema.decay})" if which == "EMA" else which
        extra = {"weights": f"{self.cfg.run_dir}, {label}", "views": f"{ev.num_clips} clips x {ev.num_crops} crops",
                 "clips": describe_clips(loader.cfg), "shards": ev.shards}
        _, line = report(result, preds, out, f"{self.cfg.name}: held-out evaluation, {label}", extra,
                         class_names_of(ev.shards))
        return line if which == "model" else f"{label} {line}"  # the model's line as ever ("eval: top-1 ...")

    def ema_model(self, engine: Any) -> nn.Module:
        """A plain classifier holding the EMA weights, in the run's dtype, outside ZeRO (collective)."""
        weights = self.ema.full_weights()
        model = create_classifier(self.cfg.model.name, self.ft.num_classes, **self.classifier_overrides())
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"EMA weights do not fit the classifier: missing {missing[:4]}, unexpected "
                               f"{unexpected[:4]}")
        if self.pos_table is not None:
            model.pos_embed.copy_(self.pos_table)
        return model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def eval_loader(self, rank: int, world: int) -> Any:
        from ..data import EvalLoader

        ev = self.ft.eval
        base = self.cfg.shards_config().model_dump() if self.cfg.data.kind == "shards" else {}
        spec = self.cfg.model.spec()
        shards = eval_data_config(base, ev.shards, ev.num_workers, spec.num_frames, spec.img_size)
        return EvalLoader(shards, batch_size=ev.batch_size, rank=rank, world_size=world, num_clips=ev.num_clips,
                          num_crops=ev.num_crops)


# what defines a test clip, carried from the training data to the evaluation (the rest is training-only or the
# loader's own business: where the shards are, workers, memory bounds, crop scales, epochs)
CLIP_FIELDS = ("sampling", "segment_style", "sampling_rate", "source_sampling_rate", "stride_views", "antialias",
               "backend")
# how remote shards are read: the held-out set usually lives where the training set does
READ_FIELDS = ("read_timeout_s", "read_retries", "retry_backoff_s", "remote_commands", "cache_dir", "cache_gib")


def finetune_data(shards: Any) -> Any:
    """The fine-tuning loader's DataConfig: what data.shards leaves open filled as the authors' fine-tuning
    loader does (frames on a linspace, crops resized without antialiasing)."""
    fill = {"frame_spacing": shards.frame_spacing or "linspace",
            "antialias": False if shards.antialias is None else shards.antialias}
    return shards.model_copy(update=fill)


def eval_data_config(base: dict, shards: str, workers: int, num_frames: int, img_size: int) -> Any:
    """The DataConfig for evaluation shards: the training clips' definition (CLIP_FIELDS) and the remote read
    settings where given."""
    from ..data import DataConfig

    keep = {k: base[k] for k in CLIP_FIELDS + READ_FIELDS if base.get(k) is not None}
    if keep.get("backend") == "nvdec":  # the GPU decoder serves the training loaders; test views decode on the CPU
        keep["backend"] = "pyav"
    return DataConfig(shards=shards, num_frames=num_frames, input_size=img_size, num_workers=workers, **keep)


def describe_clips(cfg: Any) -> str:
    """What one test view is, for the report: frames, sampling and its style, size, resize."""
    if cfg.sampling == "segments":
        how = f"{cfg.num_frames} frames, segments ({cfg.segment_style})"
    else:
        rates = ", ".join(f"{k} {v}" for k, v in sorted(cfg.source_sampling_rate.items()))
        how = f"{cfg.num_frames} frames, stride {cfg.sampling_rate}" + (f" ({rates})" if rates else "") + \
            f", {cfg.stride_views} views"
    return f"{how}, {cfg.input_size} px, {'antialiased' if cfg.antialias else 'plain'} bilinear resize"


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
