"""What `vmae-pretrain` and `vmae-finetune` share: arguments, config loading, the objective, exit codes."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError


def parse_args(prog: str, description: str, epilog: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (e.g. configs/pretrain/vit_base_hybrid.yaml)")
    p.add_argument("--resume", default="none", metavar="auto|none|CKPT_DIR",
                   help="auto: newest complete checkpoint of this run (fresh start if none); "
                        "none: start fresh (default); or a checkpoint folder runs/<name>/checkpoints/step_...")
    p.add_argument("--check", action="store_true",
                   help="validate the run config and DeepSpeed JSON, print the derived values and the memory "
                        "estimate (peak per device, the checkpointing that fits, the largest micro-batch), and exit")
    p.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                   help="plan memory for a device of this size instead of this machine's (e.g. 80 or 40); "
                        "same as activation_checkpointing.memory_gib=GIB")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="with --check: plan for N ranks (derived batch, lr and ZeRO partitions) without a launcher")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # launcher's
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def run_job(job: str, prog: str, description: str, epilog: str, argv: list[str] | None = None,
            default_objective: str | None = None) -> int:
    """Load the config, check that its objective belongs to this entry point, then check or train."""
    args = parse_args(prog, description, epilog, argv)
    from ..objectives import REGISTRY, make_objective
    from .launch import world_from_env
    from .memory_check import check_memory
    from .run_config import load_run_config
    from .trainer import RunStopped, prepare, train

    overrides = list(args.overrides)
    if args.gpu_memory_gib is not None:
        overrides.append(f"activation_checkpointing.memory_gib={args.gpu_memory_gib}")
    if default_objective and not any(o.split("=", 1)[0].strip() == "objective" for o in overrides) \
            and not _file_sets_objective(args.config):
        overrides = [f"objective={default_objective}", *overrides]
    try:
        cfg = load_run_config(args.config, overrides)
        cls = REGISTRY.get(cfg.objective)
        if cls is None or cls.job != job:
            mine = [n for n, c in REGISTRY.items() if c.job == job]
            raise ConfigError(f"objective {cfg.objective} is not run by {prog} (it runs: {', '.join(mine)})")
        objective = make_objective(cfg)
        if args.check:
            rank, world = world_from_env()
            if args.world_size:
                os.environ["WORLD_SIZE"], world = str(args.world_size), args.world_size
            d, ds = prepare(cfg, objective.build_loader(rank, world))
            print("\n".join(d.lines(cfg.optim.base_lr)))
            memory = check_memory(cfg, ds, world, objective, always=True)
            print("\n".join(memory.lines()) if memory else
                  f"memory estimate: none for objective {cfg.objective} (its frozen teacher is not counted)")
            print("config OK")
            return 0
        return train(cfg, args.resume, objective)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return e.code


def _file_sets_objective(path: str | None) -> bool:
    if path is None:
        return False
    import yaml

    try:
        data = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError):
        return True  # let the config loader report the file's problem
    return isinstance(data, dict) and "objective" in data


def leave(code: int) -> None:
    """Console-script exit: everything is flushed and closed by run_job(), then the process leaves without
    running native static destructors (see engine.trainer.shutdown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
