"""DeepSpeed config: load the JSON, fill the values the run config owns, refuse contradictions.

The run config is the single source of truth for batch sizes, precision, clipping and the optimizer;
a DeepSpeed JSON may leave those as "auto" (or out). If it states them, they must agree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from . import zero_checks
from .optim import Derived
from .run_config import RunConfig

AUTO = "auto"


def load_ds_json(path: str | Path) -> dict:
    """Read the DeepSpeed JSON; a relative path not found from the working directory is tried
    against the checkout (so recipes' `ds_configs/zero3.json` work from any folder)."""
    p = Path(path)
    checkout = Path(__file__).resolve().parents[2]
    if not p.is_absolute() and not p.exists():
        in_checkout = checkout / p
        p = in_checkout if in_checkout.exists() else p
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        where = "" if Path(path).is_absolute() else f" (looked under {Path.cwd()} and {checkout})"
        raise ConfigError(f"deepspeed_config: file not found: {path}{where}") from None
    except OSError as e:  # a folder, no permission, ...
        raise ConfigError(f"deepspeed_config {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {path}: not valid JSON ({e})") from None


def _agree(ds: dict, key: str, want: Any, source: str, path: str) -> None:
    """Fill `key` if absent/"auto", else demand equality (one-line error naming both sides)."""
    have = ds.get(key, AUTO)
    if have == AUTO:
        ds[key] = want
    elif have != want:
        raise ConfigError(f"{path}: {key}={have!r} disagrees with the run config ({source} gives {want!r}); "
                          f"set it to \"auto\" or change the run config")


def resolve_ds_config(cfg: RunConfig, d: Derived, raw: dict | None = None) -> dict:
    """The dict handed to `deepspeed.initialize` / `zero.Init`, validated against `cfg`."""
    path = cfg.deepspeed_config
    ds = copy.deepcopy(raw if raw is not None else load_ds_json(path))
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the '{key}' section; the optimizer and lr schedule come from "
                              f"the run config's optim section")
    if ds.get("fp16", {}).get("enabled") in (True, AUTO):
        raise ConfigError(f"{path}: fp16 is not supported (use precision: bf16 or fp32 in the run config)")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")

    if cfg.speed.compile and stage == 3:  # found on the CPU: dynamo stops in deepspeed/runtime/zero/linear.py
        raise ConfigError(f"speed.compile does not work with ZeRO-3 ({path}): DeepSpeed's partitioned linear layer "
                          f"cannot be traced; use a stage 1 or 2 config, or leave speed.compile off")
    _overlap_comm(ds, cfg.speed.overlap_comm, d.world_size)
    o = cfg.optim
    micro = f"optim.batch_size {o.batch_size} x data.num_sample {cfg.data.num_sample}"
    _agree(ds, "train_micro_batch_size_per_gpu", d.micro_batch_per_gpu, micro, path)
    _agree(ds, "gradient_accumulation_steps", o.grad_accum, "optim.grad_accum", path)
    _agree(ds, "train_batch_size", d.micro_batch_per_gpu * o.grad_accum * d.world_size,
           f"{micro} x optim.grad_accum {o.grad_accum} x world size {d.world_size}", path)
    _agree(ds, "gradient_clipping", o.clip_grad or 0.0, "optim.clip_grad", path)

    bf16 = ds.setdefault("bf16", {})
    _agree(bf16, "enabled", cfg.precision == "bf16", f"precision {cfg.precision}", path + " bf16")
    ds.setdefault("steps_per_print", 10**9)  # our own metrics replace DeepSpeed's step logging
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer synchronizes the device at every forward and step; StepTimer's CUDA events
    # measure the same without stalling the queue
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds


def _overlap_comm(ds: dict, setting: bool | str, world_size: int) -> None:
    """With overlap_comm DeepSpeed reduces each gradient bucket on a side stream and synchronizes the whole device
    before reusing its buffers (ZeRO-1/2: every bucket and the end of backward); at world size 1 there is no
    communication to hide, only those stalls. The reduced gradients are the same either way."""
    zo = ds["zero_optimization"]
    if setting == "auto":
        if world_size == 1:
            zo["overlap_comm"] = False
    else:
        zo["overlap_comm"] = bool(setting)


def zero_stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])


def offloads_optimizer(ds: dict) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


def build_engine(cfg: RunConfig, ds: dict, objective: Any,
                 checkpointing: tuple[str, int] | None = None) -> tuple[Any, list[str]]:
    """The DeepSpeed engine around the objective's model, and report lines (weights loaded, ...).
    `checkpointing`: (mode, num_blocks) as planned, when activation_checkpointing.mode is auto."""
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical init on every rank (zero.Init also broadcasts rank 0's)
    stage3 = zero_stage(ds) == 3
    # Stage 3: parameters are partitioned as each module is built, so ViT-g never exists whole on one rank.
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage3):
        model = objective.build_model()
    lines: list[str] = []
    if getattr(objective, "has_initial_weights", False):
        # every rank reads the file; rank 0's result is what the partitions keep
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=stage3):
            lines = objective.initial_weights(model)
    ac = cfg.activation_checkpointing
    mode, num_blocks = checkpointing or (ac.mode, ac.num_blocks)
    if mode == "auto":
        raise ValueError("activation_checkpointing.mode auto must be resolved by the memory plan first")
    model.set_activation_checkpointing(mode, num_blocks)
    if cfg.speed.compile:  # compiled lazily at the first step, which therefore takes tens of seconds
        lines.append(f"torch.compile: {compile_blocks(model)} transformer blocks")
    groups = objective.param_groups(model)
    o = cfg.optim
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam(groups, lr=o.base_lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    else:
        from deepspeed.accelerator import get_accelerator

        on_cuda = get_accelerator().device_name() == "cuda"
        fused = on_cuda if o.fused is None else o.fused
        opt = torch.optim.AdamW(groups, lr=o.base_lr, betas=o.betas, eps=o.eps, fused=fused or None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    move_buffers(engine.module, engine.device)
    if cfg.speed.fused_grad_checks:
        zero_checks.install(engine.optimizer)
    return engine, lines


def move_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Buffers onto the engine's device, dtype kept. The position tables are made on the host (numpy: under
    zero.Init torch constructors would cast them to bf16), and ZeRO-3 moves parameters, not buffers."""
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile each transformer block in place (regions compile fast and ZeRO hooks stay outside)."""
    from ..models.vit import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:
        b.compile()
    return len(blocks)


def gathered_state(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 parameters (gathered under ZeRO-3) on rank 0 (collective)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().cpu().clone() for k, v in params.items()}
