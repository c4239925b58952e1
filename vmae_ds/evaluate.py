"""`vmae-eval`: multi-view evaluation of a video classifier on held-out shards.

Each video is cut into clips x crops views (Kinetics 5 x 3, SSv2 2 x 3), the softmax scores are averaged over
its views, and every video is counted exactly once over all ranks. Writes eval.json, eval.md, predictions.jsonl
and, up to 50 classes, confusion.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engine.entry import leave
from .engine.launch import inference_setup

EPILOG = """\
examples:
  # a fine-tuning run (model, classes, views and clip sampling from its config; its newest checkpoint):
  vmae-eval runs/vitb_k400 --shards shards/k400_val
  # the moving average of its weights (runs with finetune.ema.enabled):
  vmae-eval runs/vitb_k400 --ema
  # UMT-style sparse clips of an exported model: 8 frames, one per segment, 4 x 3 views
  vmae-eval weights/umt_b16_k400.safetensors --model B --frames 8 --tubelet 1 --sampling segments \
      --segment-style sparse --clips 4 --crops 3 --shards shards/k400_val
  # exported or official weights: say the model (classes come from the checkpoint's head; our exports also
  # carry their run's clip sampling and views):
  vmae-eval weights/vitb_k400.safetensors --model B --shards shards/k400_val --clips 5 --crops 3
  # several GPUs: each scores a share of the videos
  deepspeed --num_gpus 8 --module vmae_ds.evaluate runs/vitb_k400 --shards shards/k400_val
  # how often does a distilled student agree with its teacher?
  vmae-eval runs/student --shards shards/val --agree-with runs/teacher/eval/predictions.jsonl
"""


class EvalSetupError(ValueError):
    """Weights, model or shards that cannot be evaluated; one line naming them."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmae-eval", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a fine-tuning run folder (runs/<name>, or one of its step_* folders), a file "
                                   "exported by vmae-export, an official VideoMAE checkpoint or an HF folder")
    p.add_argument("--shards", help="held-out shards: folder or index.json with sample counts (default: the run's "
                                    "finetune.eval.shards)")
    p.add_argument("--model", help="model name or alias (S, B, L, H, g, ...); default: the run's")
    p.add_argument("--num-classes", type=int, help="default: the run's, or the checkpoint head's rows")
    p.add_argument("--clips", type=int, help="temporal views per video (default: the run's, else 5)")
    p.add_argument("--crops", type=int, help="spatial views per clip (default: the run's, else 3)")
    p.add_argument("--batch", type=int, default=None, help="videos per forward per rank (default 4)")
    p.add_argument("--chunk", type=int, default=0, help="most clips per forward (0: the whole batch of views)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes per rank (default 2)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    p.add_argument("--img-size", type=int, help="crop size (default: the model's)")
    p.add_argument("--tubelet", type=int, help="tubelet size (default: the model's)")
    p.add_argument("--sampling-rate", type=int, help="frame stride (default: the run's, else 4)")
    p.add_argument("--sampling", choices=("stride", "segments"),
                   help="clips of frames a stride apart, or one frame from each of num_frames segments (TSN / UMT) "
                        "(default: the run's, else stride)")
    p.add_argument("--segment-style", choices=("tsn", "sparse", "even"),
                   help="with segments: where the views sit in each segment (default: the run's, else tsn)")
    p.add_argument("--pos-embed", choices=("interpolate", "fresh"), default="interpolate",
                   help="a weights file without a position table at another --frames / --img-size than it was "
                        "trained at: interpolate its table (default, as fine-tuning does) or build a fresh one")
    p.add_argument("--ema", action="store_true",
                   help="a run folder: evaluate the moving average of its weights (finetune.ema) instead")
    p.add_argument("--attention", default="auto", choices=("auto", "flash_attn", "sdpa", "math"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", help="report folder (default: <run>/eval, or eval/<weights name>)")
    p.add_argument("--agree-with", metavar="PREDICTIONS.jsonl",
                   help="also report the share of videos whose top-1 equals that of another evaluation")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    """(classifier with weights, settings dict): from a run folder or from a weights file + flags."""
    import torch

    from .models import create_classifier, load_pretrained
    from .models.checkpoint_import import read_canonical

    path = Path(args.weights)
    if not path.exists():
        raise EvalSetupError(f"{path}: no such run folder or weights file")
    from .export import run_config_of

    cfg = run_config_of(path) if path.is_dir() else None
    sizes = {k: v for k, v in (("num_frames", args.frames), ("img_size", args.img_size),
                               ("tubelet_size", args.tubelet)) if v is not None}
    if cfg is not None:
        if cfg.finetune is None:
            raise EvalSetupError(f"{path}: a {cfg.objective} run; vmae-eval scores classifiers (classify/distill)")
        from .export import find_checkpoint, trained_weights

        state = trained_weights(find_checkpoint(path), "ema" if args.ema else "model")
        table = state.pop("pos_embed", None)
        model_name = args.model or cfg.model.name
        num_classes = args.num_classes or cfg.finetune.num_classes
        over = {k: v for k, v in cfg.model.overrides().items()
                if k not in ("decoder_depth", "decoder_dim", "decoder_heads", "drop_path_rate", "attention")}
        model = create_classifier(model_name, num_classes, attention=args.attention, **{**over, **sizes})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EvalSetupError(f"{path}: checkpoint does not fit {model_name}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        if table is not None:  # the run's interpolated position table (finetune.pos_embed)
            if table.shape != model.pos_embed.shape:
                raise EvalSetupError(f"{path}: its position table {tuple(table.shape)} does not fit the model's "
                                     f"{tuple(model.pos_embed.shape)} (--frames / --img-size differ from the run)")
            model.pos_embed.copy_(table)
        ev = cfg.finetune.eval
        run = path.parent.parent if path.name.startswith("step_") else path
        settings = {"shards": args.shards or ev.shards, "clips": args.clips or ev.num_clips,
                    "crops": args.crops or ev.num_crops, "batch": args.batch or ev.batch_size,
                    "data": cfg.shards_config().model_dump() if cfg.data.kind == "shards" else {},
                    "out": args.out or str(run / ("eval_ema" if args.ema else "eval"))}
    else:
        if args.ema:
            raise EvalSetupError(f"{path}: --ema reads a fine-tuning run folder (its checkpoints hold the average)")
        if not args.model:
            raise EvalSetupError(f"{path}: a weights file: give --model (S, B, L, H, g, or a registry name)")
        canon, _ = read_canonical(path)
        head = canon.get("head.weight")
        num_classes = args.num_classes or (head.shape[0] if head is not None else None)
        if num_classes is None:
            raise EvalSetupError(f"{path}: the checkpoint has no classification head: not a fine-tuned model")
        model = create_classifier(args.model, num_classes, attention=args.attention, **sizes)
        load_pretrained(model, path, strict=True)
        fit_position_table(model, path, args.model, args.pos_embed)
        from .models.init_weights import exported_config

        run = exported_config(path) or {}  # our exports carry their run's config: its clips, its views
        data = run.get("data") or {}
        views = (run.get("finetune") or {}).get("eval") or {}
        settings = {"shards": args.shards, "clips": args.clips or views.get("num_clips", 5),
                    "crops": args.crops or views.get("num_crops", 3), "batch": args.batch or 4,
                    "data": dict(data.get("shards") or {}) if data.get("kind") == "shards" else {},
                    "out": args.out or str(Path("eval") / path.stem)}
    if settings["shards"] is None:
        raise EvalSetupError("no shards to evaluate on: give --shards (or finetune.eval.shards in the run config)")
    for key, value in (("sampling_rate", args.sampling_rate), ("sampling", args.sampling),
                       ("segment_style", args.segment_style)):
        if value:
            settings["data"][key] = value
    return model.eval().requires_grad_(False), num_classes, settings, torch


def fit_position_table(model, path: Path, model_name: str, mode: str) -> None:
    """A checkpoint without its own table, evaluated at another grid than it was trained at: interpolate the
    trained grid's table (as finetune.pos_embed=interpolate does), unless mode is fresh."""
    import torch

    from .models.init_weights import trained_grid
    from .models.pos_embed import interpolated_table, sinusoid_table

    if mode != "interpolate" or not torch.equal(model.pos_embed, sinusoid_table(*model.pos_embed.shape[1:])):
        return
    source = trained_grid(str(path), model_name)
    if tuple(source) != tuple(model.grid):
        model.pos_embed.copy_(interpolated_table(source, model.grid, model.dim))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from .data.shards import ShardSpecError
    from .models.checkpoint_import import CheckpointError

    try:
        return _evaluate(args)
    except (EvalSetupError, CheckpointError, ShardSpecError, FileNotFoundError) as e:
        print(f"vmae-eval: error: {e}", file=sys.stderr, flush=True)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .data import EvalLoader
    from .eval.run import agreement, evaluate, read_predictions, report
    from .objectives.classify import class_names_of, describe_clips, eval_data_config

    model, num_classes, settings, torch = build_model(args)
    rank, world, device, dtype = inference_setup(args.dtype)
    model = model.to(device=device, dtype=dtype)
    data = eval_data_config(settings["data"], settings["shards"], args.workers, model.num_frames, model.img_size)
    loader = EvalLoader(data, batch_size=settings["batch"], rank=rank, world_size=world,
                        num_clips=settings["clips"], num_crops=settings["crops"])
    result, preds = evaluate(model, loader, num_classes, device, dtype, rank, world, chunk=args.chunk)
    code = 0
    if rank == 0:
        extra = {"weights": str(args.weights) + (" (EMA)" if args.ema else ""),
                 "views": f"{settings['clips']} clips x {settings['crops']} crops", "clips": describe_clips(data),
                 "shards": settings["shards"]}
        if args.agree_with:
            share, n = agreement(preds_top1(preds), read_predictions(args.agree_with))
            extra["agreement"] = f"{share:.4f} of {n} videos agree with {args.agree_with}"
        paths, line = report(result, preds, settings["out"], f"evaluation of {args.weights}", extra,
                             class_names_of(settings["shards"]))
        print(line, flush=True)
        if "agreement" in extra:
            print(f"agreement: {extra['agreement']}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return code


def preds_top1(preds) -> dict[int, int]:
    return {i: t[0] for i, t in preds.top.items()}


def cli() -> None:
    leave(main())


if __name__ == "__main__":
    cli()
