"""The run config: one pydantic model for a whole training run (YAML + dotted overrides).

Every section forbids unknown keys, so a typo fails at start-up with a one-line error naming it. The common
sections (model, data, optim, checkpoint, logging, ...) serve every objective; `masks` (mae), `umt`,
`finetune` (classify, distill) and `distill` are the objectives' own, and setting one that the run's
objective does not read is an error rather than a silent no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import ConfigError, MaskConfig, ModelConfig, Strict, load_config
from ..data.config import DataConfig as ShardsConfig

OBJECTIVES = ("mae", "umt", "classify", "distill")
Objective = Literal["mae", "umt", "classify", "distill"]
# the sections each objective reads, beyond the common ones
OBJECTIVE_SECTIONS = {"mae": ("masks",), "umt": ("umt",), "classify": ("finetune",),
                      "distill": ("finetune", "distill")}
PROBED = ("mae", "umt")  # objectives whose runs may carry an in-run probe (they have no labels of their own)


class SyntheticConfig(Strict):
    """Deterministic in-memory clips (no I/O): for tests and for benchmarking the engine alone.

    A pool of `num_videos` clips, each a square moving in one of `num_classes` directions (its label)
    over a drifting gradient drawn from `seed`; batch i of rank r is a pure function of (seed, i, r).
    """

    num_videos: int = Field(64, gt=0)
    seed: int = 0
    num_classes: int = Field(4, ge=1, le=8, description="labels: direction of the moving square")
    resident: bool = Field(False, description="build each distinct batch once and hand the same tensors over again "
                           "(on the GPU: kept on the device), as a pinned, already-decoded batch would arrive: "
                           "benchmarks of the engine then measure no host work")


class DataSection(Strict):
    kind: Literal["synthetic", "shards"] = "synthetic"
    num_sample: int = Field(1, ge=1, description="samples per decoded video (repeated augmentation)")
    synthetic: SyntheticConfig = SyntheticConfig()
    shards: dict[str, Any] | None = None  # validated as vmae_ds.data DataConfig when kind == shards

    @model_validator(mode="after")
    def _check_shards(self) -> DataSection:
        if self.kind == "shards" and self.shards is None:
            raise ValueError("data.kind=shards needs a data.shards section")
        return self


class OptimConfig(Strict):
    """The VideoMAE V2 recipe: AdamW, lr = base_lr * global batch / 256, per-iteration cosine + warmup."""

    batch_size: int = Field(8, gt=0, description="videos per GPU per micro-step, BEFORE num_sample repetition")
    grad_accum: int = Field(1, gt=0)
    base_lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(0.0, ge=0, description="lr at the first warmup step; the authors' scheduler is "
                             "called without a start value, so their ramp starts at 0")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float | None = Field(None, gt=0)
    epochs: int = Field(800, gt=0)
    warmup_epochs: float = Field(40, ge=0)
    steps_per_epoch: int | None = Field(None, gt=0, description="override; default: videos // global batch")
    max_steps: int | None = Field(None, gt=0, description="stop early (the schedule still spans all epochs)")
    fused: bool | None = Field(None, description="fused AdamW kernel; default: on CUDA")

    @model_validator(mode="after")
    def _sane(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self


class ActivationCheckpointing(Strict):
    """Recompute blocks in backward instead of keeping what they saved. auto: the fastest choice whose estimated
    peak fits the device (none, then selective with as few blocks as needed, then full; vmae_ds.memory.plan)."""

    mode: Literal["auto", "none", "full", "selective"] = "none"
    num_blocks: int = Field(0, ge=0, description="selective: checkpoint the first K encoder blocks")
    memory_gib: float | None = Field(None, gt=0, description="plan for this much memory per device instead of "
                                     "what the device has (e.g. 80 for an 80 GB card; on the CPU: host RAM / ranks)")
    margin: float = Field(0.15, ge=0, lt=1, description="plan to capacity / (1 + margin): allocator fragmentation "
                          "and the estimate's error")

    @model_validator(mode="after")
    def _k(self) -> ActivationCheckpointing:
        if self.mode == "selective" and self.num_blocks < 1:
            raise ValueError("activation_checkpointing.num_blocks must be >= 1 for mode=selective")
        return self


class CheckpointConfig(Strict):
    every_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    at_end: bool = Field(True, description="save at the last step (benchmarks turn it off)")


class LoggingConfig(Strict):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    device_name: str | None = Field(None, description="peak-FLOPs table key; default: detected")
    breakdown: bool = Field(False, description="time data / forward / backward / optimizer per step (events, "
                            "read with the metrics; on the CPU every phase is exact, on a GPU too)")


class SpeedConfig(Strict):
    """Speed options that change no result (measured by `make gpu-check`)."""

    compile: bool = Field(False, description="torch.compile every transformer block")
    fused_grad_checks: bool = Field(True, description="DeepSpeed ZeRO's inf/NaN test (stages 1/2) and gradient "
                                    "norm in one multi-tensor pass instead of kernels per tensor (same results)")
    overlap_comm: bool | Literal["auto"] = Field(
        "auto", description="DeepSpeed's zero_optimization.overlap_comm: reduce gradients on a side stream while "
        "backward runs, at the price of a device synchronize per gradient bucket (ZeRO-1/2). auto: off at world "
        "size 1, where there is nothing to overlap; else as the DeepSpeed JSON says")


class DebugConfig(Strict):
    """Test hooks, never needed in real runs."""

    nan_batches: list[int] = Field(default_factory=list,
                                   description="1-based batch counts whose loss is replaced by NaN on rank 0")
    step_sleep_s: float = Field(0.0, ge=0, description="sleep inside every step, before the optimizer step "
                                "(gives kill / pre-emption tests a long step to hit)")
    sleep_steps: list[int] = Field(default_factory=list, description="1-based steps that sleep (default: all)")
    fetch_sleep_s: float = Field(0.0, ge=0, description="sleep in every batch fetch, as a slow loader would (shows "
                                 "that the step does not wait for batch preparation)")
    dump_gathered: str | None = Field(None, description="torch.save the gathered fp32 params here at the end")
    log_keys: bool = Field(False, description="append every consumed batch's sample keys to "
                           "<run>/keys.rank<r>.jsonl (coverage audits)")
    sync_report: bool = Field(False, description="CUDA: count the host-device syncs of steps 3-5 of this start "
                              "(torch.cuda.set_sync_debug_mode) and print them with where they came from")
    decode_faults: dict[str, Literal["crash", "hang"]] = Field(
        default_factory=dict, description="sample key -> crash | hang: the loader's decoder misbehaves on it")


class ProbeConfig(Strict):
    """The in-run probe (objectives mae and umt): every `every_steps` steps, frozen features of a small labelled
    set are extracted on all ranks with the current weights and scored by a kNN or linear probe; the accuracy
    goes to the progress line, metrics.jsonl, TensorBoard and <run>/probe.png. It changes no training step.
    Defaults keep it well under 5 % of a ViT-B or ViT-g recipe's time (README: what the in-run probe costs)."""

    every_steps: int = Field(1000, gt=0)
    train_shards: str = Field(description="labelled shards the probe learns from (folder or index.json)")
    val_shards: str = Field(description="labelled held-out shards it is scored on")
    kind: Literal["knn", "linear"] = "knn"
    max_samples: int = Field(1000, gt=0, description="most videos per split (the same share of every shard)")
    at_start: bool = Field(True, description="also probe a fresh run's initial weights (the baseline)")
    batch_size: int = Field(8, gt=0, description="videos per rank per forward")
    num_workers: int = Field(4, ge=0, description="decoding processes per rank for the probe clips")
    k: int = Field(20, gt=0, description="kNN neighbours")
    temperature: float = Field(0.07, gt=0, description="kNN vote temperature")
    weight_decay: float = Field(1e-3, gt=0, description="linear probe L2 penalty")


# ----------------------------------------------------------------- objective sections

class HeadMapConfig(Strict):
    """Initialise the head from a head over other classes (e.g. K710 -> K400) by matching class names."""

    source_classes: str = Field(description="class names of the checkpoint's head (one per line, or labels.json)")
    target_classes: str = Field(description="class names of this run's head, same formats")


class EvalConfig(Strict):
    """Multi-view evaluation (also run at the end of fine-tuning when `shards` is set)."""

    shards: str | None = Field(None, description="held-out shards (folder or index.json with sample counts)")
    num_clips: int = Field(5, ge=1, description="temporal views per video (Kinetics 5, SSv2 2)")
    num_crops: int = Field(3, ge=1, description="spatial views per clip (3: left/centre/right)")
    batch_size: int = Field(4, ge=1, description="videos per rank per forward (each with clips x crops views)")
    num_workers: int = Field(2, ge=0)


class EMAConfig(Strict):
    """An exponential moving average of the weights (the authors' --model_ema, timm's ModelEma): started from
    the initial weights, after every applied optimizer step ema = decay x ema + (1 - decay) x weights; kept
    in fp32, sharded over the ranks, saved with every checkpoint."""

    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1, description="the authors' --model_ema_decay default")
    eval: bool = Field(True, description="evaluate the EMA too at the end (finetune.eval), next to the model")


class FinetuneConfig(Strict):
    """Supervised post-pretraining / fine-tuning (facts section 6): a classifier on labelled clips."""

    num_classes: int = Field(gt=0)
    init: str | None = Field(None, description="weights to start from: our export, an official VideoMAE / V2 "
                             "checkpoint, or a HuggingFace VideoMAE folder (position tables adapted)")
    init_head_map: HeadMapConfig | None = None
    init_fresh_head: bool = Field(False, description="ignore the checkpoint's classification head (new labels)")
    layer_decay: float = Field(0.75, gt=0, le=1, description="lr x decay^(depth + 1 - layer): B 0.75, g 0.9")
    head_drop_rate: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0, description="mixup alpha (0 = off)")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha (0 = off)")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    randaug: str | None = Field("rand-m7-n4-mstd0.5-inc1", description="timm RandAugment spec; null = off")
    reprob: float = Field(0.25, ge=0, le=1, description="random erasing probability")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop area range")
    flip: bool = True
    no_flip_sources: list[str] = Field(default_factory=lambda: ["ssv2"],
                                       description="sources whose labels depend on left/right: never flipped")
    randaug_order: Literal["before_crop", "after_crop"] = Field(
        "before_crop", description="before_crop: RandAugment on the full frames, then the random resized crop "
        "(the authors); after_crop: on the S x S crop (cheaper)")
    randaug_interpolation: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="RandAugment's rotate / shear / translate resampling (the authors': bicubic)")
    pos_embed: Literal["interpolate", "fresh"] = Field(
        "interpolate", description="position table at another frame count or size than the initial weights "
        "were trained at: interpolate their table (bicubic in space, linear in time, as UMT's fine-tuning) or "
        "build a fresh sinusoid for this grid; the same either way at the initial weights' own grid")
    ema: EMAConfig = EMAConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _ranges(self) -> FinetuneConfig:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        return self


class TeacherConfig(Strict):
    """A frozen classifier teacher (e.g. ViT-g after K710 post-pretraining)."""

    model: str = Field(description="registry name or alias of the teacher's size (g, B, ...)")
    weights: str = Field(description="its fine-tuned weights (our export, official or HF checkpoint)")
    num_classes: int | None = Field(None, gt=0, description="default: the student's")
    attention: Literal["auto", "flash_attn", "sdpa", "math"] = "auto"
    num_frames: int | None = Field(None, gt=0)
    img_size: int | None = Field(None, gt=0)
    tubelet_size: int | None = Field(None, gt=0)


class DistillConfig(Strict):
    """Logit distillation: KL(teacher || student) at a temperature, plus an optional hard-label term."""

    teacher: TeacherConfig
    temperature: float = Field(1.0, gt=0)
    hard_label_weight: float = Field(0.0, ge=0, le=1, description="loss = (1-w) KL T^2 + w CE(labels)")


class UMTTeacherConfig(Strict):
    name: Literal["clip_b16", "clip_l14", "clip_tiny_debug"] = "clip_b16"
    path: str = Field(description="CLIP visual weights in OpenAI key layout (.pt/.pth/.safetensors, an open_clip "
                      "checkpoint, or OpenAI's TorchScript archive)")


class UMTConfig(Strict):
    """Unmasked Teacher stage 1 (facts section 7)."""

    teacher: UMTTeacherConfig
    align_layers: int = Field(6, ge=1, description="K: the last K blocks of student and teacher are aligned")
    mask: Literal["attention", "tube", "random"] = "attention"
    mask_ratio: float = Field(0.8, gt=0, lt=1)
    flip: bool = Field(True, description="flip each clip horizontally with p 0.5 after its crop (the authors' "
                       "--flip True; VideoMAE pretraining never flips)")
    teacher_normalize: Literal["student", "clip"] = Field(
        "student", description="the teacher's input: student (the student's ImageNet-normalised frames as they "
        "are, the authors) or clip (re-normalised to CLIP's mean / std, what CLIP was trained on)")
    teacher_resize: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="resampling of the frames to the teacher's size when it differs (UMT-L: 224 -> 196; "
        "the authors: bicubic)")


class RunConfig(Strict):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    deepspeed_config: str = "ds_configs/zero2.json"
    objective: Objective = "mae"
    model: ModelConfig = ModelConfig()
    masks: MaskConfig = MaskConfig()
    umt: UMTConfig | None = None
    finetune: FinetuneConfig | None = None
    distill: DistillConfig | None = None
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing()
    data: DataSection = DataSection()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    speed: SpeedConfig = SpeedConfig()
    max_consecutive_nonfinite: int = Field(5, gt=0, description="stop after this many non-finite losses in a row")
    probe: ProbeConfig | None = None
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="after")
    def _objective_sections(self) -> RunConfig:
        mine = OBJECTIVE_SECTIONS[self.objective]
        for section, owner in (("masks", "mae"), ("umt", "umt"), ("finetune", "classify/distill"),
                               ("distill", "distill")):
            given = section in self.model_fields_set and getattr(self, section) is not None
            if given and section not in mine:
                raise ValueError(f"section '{section}' is read by objective {owner}, but this run's objective is "
                                 f"{self.objective}")
        for section in mine:
            if section != "masks" and getattr(self, section) is None:
                raise ValueError(f"objective {self.objective} needs a '{section}' section")
        if self.probe is not None and self.objective not in PROBED:
            raise ValueError(f"section 'probe' is for pretraining (objectives {', '.join(PROBED)}); a "
                             f"{self.objective} run is scored by finetune.eval")
        return self

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
        from ..data.shards import ShardSpecError, config_shards

        try:
            config_shards(cfg.shards_config())
        except ShardSpecError as e:  # its message starts with "shards: " and names the path
            raise ConfigError(f"data.shards.{e}") from None
        if cfg.shards_config().backend == "nvdec":  # no CUDA or no PyNvVideoCodec: one line, before any start-up
            from ..data.nvdec import NvdecUnavailable, check_available

            try:
                check_available()
            except NvdecUnavailable as e:
                raise ConfigError(str(e).replace("data.backend", "data.shards.backend")) from None
    if cfg.probe is not None:  # a typo'd probe set fails at start-up; a shard that breaks later is only reported
        from ..data.shards import ShardSpecError, resolve_set

        for field in ("train_shards", "val_shards"):
            try:
                if resolve_set(getattr(cfg.probe, field)).counts is None:
                    raise ShardSpecError(f"shards: {getattr(cfg.probe, field)}: no sample counts (point it at "
                                         f"the folder or index.json that vmae-shards build wrote)")
            except ShardSpecError as e:
                raise ConfigError(f"probe.{field}: {str(e).removeprefix('shards: ')}") from None
    return cfg
