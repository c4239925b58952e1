"""The run config: one pydantic model for a whole pretraining run (YAML + dotted overrides).

Every section forbids unknown keys, so a typo fails at start-up with a one-line error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import ConfigError, MaskConfig, ModelConfig, Strict, load_config
from ..data.config import DataConfig as ShardsConfig


class SyntheticConfig(Strict):
    """Deterministic in-memory clips (no I/O): for tests and for benchmarking the engine alone.

    A pool of `num_videos` clips, each a moving square over a drifting gradient drawn from `seed`;
    batch i of rank r is a pure function of (seed, i, r), so resuming is exact.
    """

    num_videos: int = Field(64, gt=0)
    seed: int = 0


class DataSection(Strict):
    kind: Literal["synthetic", "shards"] = "synthetic"
    num_sample: int = Field(1, ge=1, description="samples per decoded video (repeated augmentation)")
    synthetic: SyntheticConfig = SyntheticConfig()
    shards: dict[str, Any] | None = None  # validated as vmae_ds.data DataConfig when kind == shards

    @model_validator(mode="after")
    def _check_shards(self) -> DataSection:
        if self.kind == "shards":
            if self.shards is None:
                raise ValueError("data.kind=shards needs a data.shards section")
        return self


class OptimConfig(Strict):
    """The VideoMAE V2 recipe: AdamW, lr = base_lr * global batch / 256, per-iteration cosine + warmup."""

    batch_size: int = Field(8, gt=0, description="videos per GPU per micro-step, BEFORE num_sample repetition")
    grad_accum: int = Field(1, gt=0)
    base_lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float | None = Field(None, gt=0)
    epochs: int = Field(800, gt=0)
    warmup_epochs: float = Field(40, ge=0)
    steps_per_epoch: int | None = Field(None, gt=0, description="override; default: videos // global batch")
    max_steps: int | None = Field(None, gt=0, description="stop early (the schedule still spans all epochs)")

    @model_validator(mode="after")
    def _sane(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self


class ActivationCheckpointing(Strict):
    mode: Literal["none", "full", "selective"] = "none"
    num_blocks: int = Field(0, ge=0, description="selective: checkpoint the first K encoder blocks")

    @model_validator(mode="after")
    def _k(self) -> ActivationCheckpointing:
        if self.mode == "selective" and self.num_blocks < 1:
            raise ValueError("activation_checkpointing.num_blocks must be >= 1 for mode=selective")
        return self


class CheckpointConfig(Strict):
    every_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)


class LoggingConfig(Strict):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    device_name: str | None = Field(None, description="peak-FLOPs table key; default: detected")


class DebugConfig(Strict):
    """Test hooks, never needed in real runs."""

    nan_batches: list[int] = Field(default_factory=list,
                                   description="1-based batch counts whose loss is replaced by NaN on rank 0")
    step_sleep_s: float = Field(0.0, ge=0, description="sleep after every step (gives kill tests time)")
    dump_gathered: str | None = Field(None, description="torch.save the gathered fp32 params here at the end")


class RunConfig(Strict):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    deepspeed_config: str = "ds_configs/zero2.json"
    model: ModelConfig = ModelConfig()
    masks: MaskConfig = MaskConfig()
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing()
    data: DataSection = DataSection()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    max_consecutive_nonfinite: int = Field(5, gt=0, description="stop after this many non-finite losses in a row")
    debug: DebugConfig = DebugConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def shards_config(self) -> Any:
        """data.shards as the data package's DataConfig, with num_sample / num_frames / input_size filled
        from data.num_sample and the model (and checked against them when given)."""
        from pydantic import ValidationError

        from ..config import format_validation_error
        spec = self.model.spec()
        raw = dict(self.data.shards or {})
        owned = {"num_sample": (self.data.num_sample, "data.num_sample"),
                 "num_frames": (spec.num_frames, "the model's num_frames"),
                 "input_size": (spec.img_size, "the model's img_size")}
        for key, (want, source) in owned.items():
            if raw.setdefault(key, want) != want:
                raise ConfigError(f"data.shards.{key}={raw[key]!r} disagrees with {source} ({want!r})")
        try:
            return ShardsConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, ShardsConfig, prefix="data.shards.")) from None


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML + `a.b=value` overrides -> RunConfig; raises a one-line ConfigError."""
    cfg = load_config(RunConfig, path, overrides)
    if cfg.data.kind == "shards":  # fail at start-up, not at the first batch
        from ..data.shards import ShardSpecError, resolve_shards

        try:
            resolve_shards(cfg.shards_config().shards)
        except ShardSpecError as e:  # its message starts with "shards: " and names the path
            raise ConfigError(f"data.shards.{e}") from None
    return cfg
