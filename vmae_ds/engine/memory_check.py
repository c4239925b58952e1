"""The memory estimate of a run at start, before any weights exist: the capacity of this device (or the one asked
for), the plan (vmae_ds.memory.plan), and with `activation_checkpointing.mode: auto` the choice it makes."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import ConfigError
from ..memory.plan import MemoryPlan, MemoryPlanError, plan
from ..memory.states import GIB
from .ds_setup import offloads_optimizer
from .launch import local_world_size


def device_capacity(memory_gib: float | None) -> tuple[int, str]:
    """(bytes, what they are) of the memory one rank plans for."""
    if memory_gib:
        return int(memory_gib * GIB), "a device of"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)))
        return props.total_memory, props.name
    import psutil

    return psutil.virtual_memory().total // max(1, local_world_size()), "host RAM per local rank"


def check_memory(cfg: Any, ds: dict, world: int, objective: Any, always: bool = False) -> MemoryPlan | None:
    """The plan, or None where there is nothing to check (unless `always`: a CPU run with a fixed mode and no
    memory_gib; always, an objective with a frozen teacher, whose weights the estimate does not count). Raises
    ConfigError when the run cannot fit, in one line with the numbers."""
    ac = cfg.activation_checkpointing
    on_cuda = torch.cuda.is_available()
    if ac.mode != "auto" and not on_cuda and ac.memory_gib is None and not always:
        return None
    if not objective.plans_memory:
        if ac.mode == "auto":
            raise ConfigError(f"activation_checkpointing.mode auto: objective {objective.name} has no memory estimate "
                              f"(its frozen teacher is not counted); set mode none, full or selective")
        return None
    capacity, source = device_capacity(ac.memory_gib)
    # planning for another card (memory_gib) means a GPU, where AdamW is fused unless optim.fused says otherwise
    gpu = on_cuda or ac.memory_gib is not None
    fused = (gpu if cfg.optim.fused is None else cfg.optim.fused) and not offloads_optimizer(ds)
    try:
        return plan(cfg, ds, world, type(objective), capacity, source, ac.margin, fused)
    except MemoryPlanError as e:
        raise ConfigError(str(e)) from None
