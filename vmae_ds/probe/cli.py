"""`vmae-probe`: how good are an encoder's frozen features? kNN, linear and attentive probes on labelled shards.

The encoder (any weights vmae-eval / vmae-extract read: run folders of every objective, pretraining and UMT
included, our exports, official checkpoints, HF folders) encodes one centre clip of every training and
held-out video once, on every rank its share; the features are cached under <out>/features per split and rank
(a rerun, or a restart after a crash, keeps the finished files). Rank 0 then fits the probes on the cached
features: kNN (cosine, temperature-weighted votes), a linear probe (logistic regression by L-BFGS, seconds),
and an attentive probe (learned-query cross-attention on the frozen tokens, AdamW + warmup/cosine as the
engine). Per probe eval.json / eval.md / confusion.png as vmae-eval writes them, and probe.json / probe.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from ..engine.entry import leave

KINDS = ("knn", "linear", "attentive")

EPILOG = """\
examples:
  vmae-probe runs/vitb_pretrain --train-shards shards/k400_probe_train --val-shards shards/k400_val
  vmae-probe weights/vitg_pretrain.safetensors --model g --train-shards tr/ --val-shards va/ --probes knn,linear
  vmae-probe runs/umt_b16 --train-shards tr/ --val-shards va/ --max-samples 5000 --out probe/umt_b16
  vmae-probe weights/umt_b16.safetensors --model B --frames 8 --tubelet 1 --train-shards tr/ --val-shards va/
  vmae-probe runs/vitb_pretrain --random-init --train-shards tr/ --val-shards va/   # the untrained baseline
  deepspeed --num_gpus 8 --module vmae_ds.probe.cli runs/vitb_pretrain --train-shards tr/ --val-shards va/
"""


class ProbeSetupError(ValueError):
    """Weights, shards or settings that cannot be probed; one line naming them."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmae-probe", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a run folder (any objective), an exported / official checkpoint, or an HF folder")
    p.add_argument("--train-shards", required=True, help="labelled shards the probes learn from (folder / index.json)")
    p.add_argument("--val-shards", required=True, help="labelled held-out shards the probes are scored on")
    p.add_argument("--out", help="report folder (default: <run>/probe, or probe/<weights name>)")
    p.add_argument("--probes", default="knn,linear,attentive", help="comma-separated: knn, linear, attentive")
    p.add_argument("--model", help="model name or alias (default: the run's)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--tubelet", type=int, help="tubelet size (default: the model's; UMT students: 1)")
    p.add_argument("--sampling-rate", type=int, help="frame stride (default: the run's, else 4)")
    p.add_argument("--max-samples", type=int, help="most videos per split (the same share of every shard)")
    p.add_argument("--random-init", action="store_true", help="probe the same architecture at its random "
                   "initialisation (seed 0) instead of the weights: the baseline the weights must beat")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    p.add_argument("--linear-wd", type=float, default=1e-3, help="linear probe L2 penalty (default 1e-3)")
    p.add_argument("--attentive-epochs", type=int, default=20)
    p.add_argument("--attentive-min-steps", type=int, default=400,
                   help="more epochs where a small set gives fewer optimizer steps than this (default 400)")
    p.add_argument("--attentive-lr", type=float, default=4e-3, help="base lr (x batch / 256; default 4e-3)")
    p.add_argument("--attentive-batch", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="videos per forward per rank (default 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes per rank (default 2)")
    p.add_argument("--attention", default="auto", choices=("auto", "flash_attn", "sdpa", "math"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_encoder(args: argparse.Namespace):
    """(VideoClassifier with the encoder's weights, or at random init, clip settings dict from the run)."""
    import torch

    from ..export import run_config_of
    from ..extract import load_encoder
    from ..models import create_classifier
    from ..models.init_weights import exported_config

    path = Path(args.weights)
    if not path.exists():
        raise ProbeSetupError(f"{path}: no such run folder or weights file")
    cfg = run_config_of(path) if path.is_dir() else None
    if cfg is not None:
        data = cfg.shards_config().model_dump() if cfg.data.kind == "shards" else {}
    else:
        run = exported_config(path) or {}
        shards = (run.get("data") or {})
        data = dict(shards.get("shards") or {}) if shards.get("kind") == "shards" else {}
    if args.random_init:
        name = args.model or (cfg.model.name if cfg is not None else None)
        if name is None:
            raise ProbeSetupError(f"{path}: --random-init of a weights file: give --model")
        over = {k: v for k, v in cfg.model.overrides().items() if k in ("patch_size", "tubelet_size", "depth",
                "num_frames", "img_size")} if cfg is not None else {}
        over |= {k: v for k, v in (("num_frames", args.frames), ("img_size", args.img_size),
                                   ("tubelet_size", args.tubelet)) if v is not None}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_classifier(name, 1, attention=args.attention, **over)
        model = model.eval().requires_grad_(False)
    else:
        model = load_encoder(args)
    if args.sampling_rate:
        data["sampling_rate"] = args.sampling_rate
    return model, data


def fingerprint(args: argparse.Namespace, data: dict, world: int, model) -> str:
    """What the cached features depend on: the weights (path, size, time), the clips, the split, the ranks."""
    path = Path(args.weights).resolve()
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    stamp = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files[:2000]]
    text = json.dumps([stamp, args.random_init, args.max_samples, world, data, model.num_frames,
                       model.img_size, args.dtype, str(args.train_shards), str(args.val_shards)], default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def usable(path: Path, tokens: bool) -> bool:
    """A cached split serves unless the attentive probe needs tokens that it was extracted without."""
    from .features import FeatureSet

    fs = FeatureSet.load(path)
    return not tokens or fs.tokens is not None or len(fs) == 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from ..data.shards import ShardSpecError
    from ..extract import ExtractError
    from ..models.checkpoint_import import CheckpointError
    from .scoring import ProbeError

    try:
        return _probe(args)
    except (ProbeSetupError, ExtractError, CheckpointError, ShardSpecError, ProbeError, FileNotFoundError) as e:
        print(f"vmae-probe: error: {e}", file=sys.stderr, flush=True)
        return 2


def _probe(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from ..data import EvalLoader
    from ..engine.launch import inference_setup
    from ..objectives.classify import class_names_of, eval_data_config
    from .features import FeatureSet, classifier_features, extract

    kinds = [k.strip() for k in args.probes.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ProbeSetupError(f"--probes: unknown {bad or kinds} (choose from {', '.join(KINDS)})")
    if args.k < 1 or args.batch < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise ProbeSetupError("--k, --batch and --max-samples must be >= 1")
    model, data = build_encoder(args)
    rank, world, device, dtype = inference_setup(args.dtype)
    model = model.to(device=device, dtype=dtype)
    path = Path(args.weights)
    out = Path(args.out) if args.out else (path / "probe" if path.is_dir() else Path("probe") / path.stem)
    if args.random_init and not args.out:
        out = out.with_name(out.name + "_random_init")
    cache = out / "features"
    cache.mkdir(parents=True, exist_ok=True)
    tokens = "attentive" in kinds
    fp = fingerprint(args, data, world, model)
    started = time.perf_counter()
    kept = 0
    for split, shards in (("train", args.train_shards), ("val", args.val_shards)):
        target = cache / f"{split}.{fp}.rank{rank}.pt"
        if target.exists() and usable(target, tokens):
            kept += 1
            continue
        cfg = eval_data_config(data, shards, args.workers, model.num_frames, model.img_size)
        loader = EvalLoader(cfg, batch_size=args.batch, rank=rank, world_size=world, num_clips=1, num_crops=1,
                            max_samples=args.max_samples)
        bar = tqdm(total=len(loader), desc=f"features {split}", unit="batch", disable=rank != 0, leave=False)
        extract(lambda x: classifier_features(model, x), loader, device, dtype, tokens=tokens,
                progress=bar.update).save(target)
        bar.close()
    if world > 1:
        dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        return 0
    sets = {split: FeatureSet.merge([FeatureSet.load(cache / f"{split}.{fp}.rank{r}.pt") for r in range(world)])
            for split in ("train", "val")}
    extract_s = time.perf_counter() - started
    names = class_names_of(args.train_shards)
    labels = torch.cat([sets["train"].labels, sets["val"].labels])
    num_classes = len(names) if names else int(labels.max()) + 1 if labels.numel() else 1
    results, settings, lines = run_probes(kinds, sets, num_classes, names, args, device)
    train, val = sets["train"], sets["val"]
    weights = f"{args.weights} (random init, seed 0)" if args.random_init else str(args.weights)
    extra = {"weights": weights, "train shards": f"{args.train_shards} ({len(train)} videos)",
             "val shards": f"{args.val_shards} ({len(val)} videos)",
             "features": f"{'tokens and ' if tokens else ''}pooled, {model.num_frames} frames, {model.img_size} px, "
                         f"1 centre clip per video; cached in {cache} ({'kept' if kept else 'extracted'} "
                         f"in {extract_s:.1f} s)"}
    for name, fs in sets.items():
        if fs.skipped:
            extra[f"{name}: unreadable, skipped"] = (f"{len(fs.skipped)} clips ({', '.join(fs.skipped[:5])}"
                                                     f"{' ...' if len(fs.skipped) > 5 else ''}); shards "
                                                     f"{', '.join(fs.damaged_shards())}")
        if fs.unlabelled:
            extra[f"{name}: without a label, skipped"] = f"{len(fs.unlabelled)} clips"
    from .report import write_probe_reports

    md = write_probe_reports(results, out, f"frozen-feature probes of {weights}", extra, settings)
    for line in lines:
        print(line, flush=True)
    for name, fs in sets.items():
        if fs.skipped:
            print(f"probe: {name}: {len(fs.skipped)} unreadable clips skipped (shards "
                  f"{', '.join(fs.damaged_shards())})", flush=True)
    print(f"probe report: {md}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


def run_probes(kinds: list[str], sets: dict, num_classes: int, names: list[str] | None, args: argparse.Namespace,
               device) -> tuple[dict, dict, list[str]]:
    """Fit and score each probe: (results by kind, settings text by kind, one summary line per kind)."""
    from .attentive import AttentiveSettings, attentive_scores, train_attentive
    from .report import score
    from .scoring import knn_scores, linear_scores

    train, val = sets["train"], sets["val"]
    results, settings, lines = {}, {}, []
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == "knn":
            scores = knn_scores(train.pooled, train.labels, val.pooled, num_classes, k=args.k,
                                temperature=args.temperature)
            settings[kind] = f"cosine kNN, k={args.k}, T={args.temperature}"
        elif kind == "linear":
            scores = linear_scores(train.pooled, train.labels, val.pooled, num_classes, weight_decay=args.linear_wd)
            settings[kind] = f"logistic regression (L-BFGS), weight decay {args.linear_wd}"
        else:
            if train.tokens is None or val.tokens is None:
                from .scoring import ProbeError
                raise ProbeError("attentive probe: no tokens cached (no readable clips?)")
            s = AttentiveSettings(epochs=args.attentive_epochs, batch_size=args.attentive_batch,
                                  base_lr=args.attentive_lr, min_steps=args.attentive_min_steps)
            probe, history = train_attentive(train.tokens, train.labels, num_classes, s, device)
            scores = attentive_scores(probe, val.tokens, device=device)
            settings[kind] = (f"1 query cross-attention + MLP + linear, {len(history)} epochs, batch {s.batch_size}, "
                              f"base lr {s.base_lr} (warmup + cosine), final train loss {history[-1]:.4f}")
        r = score(scores.cpu(), val, num_classes, names)
        results[kind] = r
        top1 = "n/a" if r.top1 is None else f"{r.top1:.4f}"
        top5 = "n/a" if r.top5 is None else f"{r.top5:.4f}"
        lines.append(f"probe {kind}: top-1 {top1}, top-{r.top5_k} {top5} over {r.count} val videos "
                     f"({len(train)} train; {time.perf_counter() - t0:.1f} s)")
    return results, settings, lines


def cli() -> None:
    leave(main())


if __name__ == "__main__":
    cli()
