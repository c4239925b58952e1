"""`vmae-pretrain`: VideoMAE V2 pretraining with DeepSpeed (start it with the deepspeed launcher for several ranks;
typed alone it runs one process)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError

EPILOG = """\
examples:
  # 2 CPU ranks, tiny model, synthetic data (the CPU demo):
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module vmae_ds.pretrain --config configs/pretrain/debug_cpu.yaml
  # ViT-B hybrid recipe on 8 GPUs, overriding two fields:
  deepspeed --num_gpus 8 --module vmae_ds.pretrain --config configs/pretrain/vit_base_hybrid.yaml \\
      name=vitb_try1 optim.batch_size=32
  # continue a pre-empted or killed run from its newest complete checkpoint:
  deepspeed --num_gpus 8 --module vmae_ds.pretrain --config runs/vitb_try1/config.yaml --resume auto

overrides are dotted keys into the run config, value parsed as YAML (optim.clip_grad=null).
The run folder is <output_dir>/<name>/: config.yaml (resolved), run_info.json (derived lr/batch, final
DeepSpeed config), metrics.jsonl, tb/, checkpoints/. Export weights with `vmae-export RUN_DIR OUT.safetensors`.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmae-pretrain", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (e.g. configs/pretrain/vit_base_hybrid.yaml)")
    p.add_argument("--resume", default="none", metavar="auto|none|CKPT_DIR",
                   help="auto: newest complete checkpoint of this run (fresh start if none); "
                        "none: start fresh (default); or a checkpoint folder runs/<name>/checkpoints/step_...")
    p.add_argument("--check", action="store_true",
                   help="validate the run config and DeepSpeed JSON, print the derived values, and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # launcher's
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .engine.data_source import build_loader
    from .engine.run_config import load_run_config
    from .engine.train_loop import RunStopped, prepare, train, world_from_env

    try:
        cfg = load_run_config(args.config, args.overrides)
        if args.check:
            rank, world = world_from_env()
            d, _ = prepare(cfg, build_loader(cfg, rank, world))
            print("\n".join(d.lines(cfg.optim.base_lr)))
            print("config OK")
            return 0
        code = train(cfg, args.resume)
    except ConfigError as e:
        print(f"vmae-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:
        print(f"vmae-pretrain: {e}", file=sys.stderr, flush=True)
        return e.code
    return code


def cli() -> None:
    """Console-script / `python -m` entry: everything is flushed and closed by main(), then the process
    leaves without running native static destructors (see engine.train_loop.shutdown)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
