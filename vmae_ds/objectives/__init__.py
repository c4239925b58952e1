"""Training objectives the engine runs: MAE pretraining, UMT, classification and logit distillation."""

from __future__ import annotations

from ..engine.run_config import RunConfig
from .base import Objective
from .classify import ClassifyObjective
from .distill import DistillObjective
from .mae import MAEObjective
from .umt import UMTObjective

REGISTRY: dict[str, type[Objective]] = {"mae": MAEObjective, "classify": ClassifyObjective,
                                        "distill": DistillObjective, "umt": UMTObjective}


def make_objective(cfg: RunConfig) -> Objective:
    if cfg.objective not in REGISTRY:
        raise ValueError(f"objective {cfg.objective!r} is not available; known: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.objective](cfg)
