"""Training objectives the engine runs: MAE pretraining, UMT, classification and logit distillation."""

from __future__ import annotations

from ..engine.run_config import RunConfig
from .base import Objective
from .mae import MAEObjective

REGISTRY: dict[str, type[Objective]] = {"mae": MAEObjective}


def make_objective(cfg: RunConfig) -> Objective:
    if cfg.objective not in REGISTRY:
        raise ValueError(f"objective {cfg.objective!r} is not available; known: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.objective](cfg)
