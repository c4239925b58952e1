"""What an objective supplies to the engine; the engine itself knows none of them.

The engine (vmae_ds.engine.trainer) owns the process group, DeepSpeed, zero.Init, the optimizer, the lr
schedule, the step loop with its non-finite policy, pre-emption, checkpoints with exact resume, and metrics.
An objective owns what differs between MAE pretraining, UMT, classification and distillation: the model,
frozen helpers (teachers), parameter groups, the loader, moving a batch to the device, the loss and its
metrics, and the FLOPs that MFU counts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..engine.optim import param_groups
from ..engine.run_config import RunConfig


class Objective:
    """Base class: override what differs. Methods run on every rank."""

    name: ClassVar[str] = ""
    # entry points that may run it: vmae-pretrain (pretrain) or vmae-finetune (finetune)
    job: ClassVar[str] = "pretrain"
    # its peak memory can be estimated before the run (vmae_ds.memory): a model and loss, no frozen teacher
    plans_memory: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        """The trained model; the engine calls it inside `deepspeed.zero.Init` under ZeRO-3."""
        raise NotImplementedError

    def initial_weights(self, model: nn.Module) -> list[str]:
        """Load starting weights into `model` (on every rank; under ZeRO-3 inside GatheredParameters with
        rank 0's result kept). Returns report lines for the log."""
        return []

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW groups; a group may carry `lr_scale` (layer-wise decay), applied on top of the schedule."""
        return param_groups(model, self.cfg.optim.weight_decay)

    def setup(self, device: torch.device) -> list[str]:
        """Device constants and frozen modules (teachers), outside ZeRO and the optimizer. Report lines."""
        self.device = device
        return []

    # ---------------------------------------------------------------- data
    def build_loader(self, rank: int, world: int) -> Any:
        raise NotImplementedError

    def to_device(self, batch: dict) -> dict:
        """Copies only (no randomness: a batch may be moved one step early, before a checkpoint)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- step
    def loss(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, extra metrics as device scalars); no `.item()` here: the engine reads them in bulk."""
        raise NotImplementedError

    def flops_per_sample(self) -> dict[str, float]:
        """FLOPs per sample of one training step: 'model' (forward + backward of what trains, recompute not
        counted) and, when there is one, 'teacher' (its forward)."""
        raise NotImplementedError

    def probe_features(self, model: Any, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, D) float32, tokens (B, N, D)) of the model's encoder on normalised float `video`, for the
        in-run probe (run config `probe:`); runs under no_grad in eval mode with the weights gathered."""
        raise NotImplementedError(f"objective {self.name} has no in-run probe")

    def after_step(self, engine: Any, step: int) -> None:
        """After every applied optimizer step (not a skipped non-finite one), on every rank; `step` is the number
        of applied steps so far (e.g. an EMA of the weights folds them in here)."""

    def state_dict(self) -> dict:
        """Objective state that checkpoints must carry (e.g. an EMA); per rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, engine: Any, run_dir: Any, rank: int, world: int) -> list[str]:
        """After the last step, on every rank (e.g. the final evaluation). Report lines for rank 0."""
        return []
