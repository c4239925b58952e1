"""`vmae-export RUN_DIR OUT`: consolidate a sharded DeepSpeed checkpoint into one fp32 file, or an HF folder.

The safetensors file holds the trained model's state dict with the official key names (pretraining:
encoder.blocks.0.attn.qkv.weight, decoder.head.weight, mask_token, ...; classifier: blocks.*, fc_norm, head;
UMT: the student encoder plus its alignment heads) in float32, loadable with `vmae_ds.models.load_pretrained`
into a PretrainVideoMAE or, keeping the encoder, a VideoClassifier for fine-tuning (`finetune.init`).
`--format hf` writes a transformers VideoMAE folder (config.json + model.safetensors) instead:
VideoMAEForPreTraining for MAE runs, VideoMAEForVideoClassification for fine-tuning runs.
Runs on CPU, no process group needed: it reads the fp32 master weights from the ZeRO optimizer shards
(`--weights ema`: the fp32 moving average of a fine-tuning run with `finetune.ema`, from the ranks' files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .engine.checkpoint import POINTER, read_pointer


def find_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its newest complete checkpoint), a checkpoints/ folder, or one checkpoint folder."""
    p = Path(path)
    for ckpt_dir in (p / "checkpoints", p):
        tag = read_pointer(ckpt_dir)
        if tag is not None:
            return ckpt_dir / tag
    if p.is_dir() and p.name.startswith("step_"):
        return p
    raise FileNotFoundError(f"{path}: no complete checkpoint (looked for checkpoints/{POINTER} and step_* folders)")


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict (parameters only; the fixed position tables are rebuilt by the model)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def trained_weights(folder: Path, which: str = "model") -> dict[str, torch.Tensor]:
    """A checkpoint's weights as one fp32 state dict: the model's (ZeRO's master weights) or its EMA
    (`finetune.ema`), plus `pos_embed` when the run's position table is not its grid's fresh sinusoid (an
    interpolated one: the classifier loads it into its buffer)."""
    if which == "ema":
        from .engine.ema import read_ema_weights

        sd = read_ema_weights(folder)
    elif which == "model":
        sd = consolidate(folder)
    else:
        raise ValueError(f"weights must be model or ema, got {which!r}")
    table = position_table_of(folder)
    if table is not None:
        sd["pos_embed"] = table
    return sd


def position_table_of(folder: Path) -> torch.Tensor | None:
    """The position table a fine-tuning run saved with its checkpoint (finetune.pos_embed=interpolate at another
    grid than its initial weights'), else None."""
    rank0 = folder / "rank_00000.pt"
    if not rank0.is_file():
        return None
    state = torch.load(rank0, weights_only=False, map_location="cpu").get("objective", {})
    table = state.get("pos_embed")
    return None if table is None else table.float().contiguous()


class ExportError(ValueError):
    """The output cannot be written; the message names the path."""


def export(run_or_ckpt: str | Path, out: str | Path, fmt: str = "safetensors", weights: str = "model") -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if fmt == "safetensors" and out.is_dir():  # checked before the (long) consolidation
        raise ExportError(f"{out} is a folder: give the output file, e.g. {out / 'model.safetensors'}")
    if fmt == "hf" and out.is_file():
        raise ExportError(f"{out} is a file: --format hf writes a folder (config.json + model.safetensors)")
    folder = find_checkpoint(run_or_ckpt)
    cfg = _config_of(folder)
    if fmt == "hf" and position_table_of(folder) is not None:
        raise ExportError(f"{folder}: the run's position table is interpolated from its initial weights' grid "
                          f"(finetune.pos_embed=interpolate); transformers' VideoMAE always builds a fresh one, so "
                          f"its outputs would differ: export the safetensors file, or fine-tune with "
                          f"finetune.pos_embed=fresh")
    try:
        (out if fmt == "hf" else out.parent).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder of {out}: {e.strerror or e}") from None
    try:
        sd = trained_weights(folder, weights)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    n = sum(v.numel() for k, v in sd.items() if k != "pos_embed")
    what = f"{len(sd)} tensors, {n / 1e6:.2f} M parameters, fp32" + (", its EMA" if weights == "ema" else "")
    if fmt == "hf":
        written = _save_hf(sd, cfg, out)
        print(f"exported {folder} -> {written} (transformers VideoMAE folder): {what}")
        return written
    meta = {"format": "vmae_ds." + (cfg.objective if cfg is not None else "pretrain"), "checkpoint": str(folder),
            "weights": weights}
    if cfg is not None:
        meta["config"] = json.dumps(cfg.model_dump(mode="json"))
    try:
        save_file(sd, str(out), metadata=meta)
    except Exception as e:  # safetensors' I/O errors are its own type, not OSError
        raise ExportError(f"cannot write {out}: {str(e).strip().splitlines()[0]}") from None
    print(f"exported {folder} -> {out}: {what}")
    return out


def run_config_of(path: str | Path):
    """The run config saved with the newest complete checkpoint of a run folder (or with one checkpoint
    folder); None for anything else (a weights file, an HF folder)."""
    try:
        return _config_of(find_checkpoint(path))
    except FileNotFoundError:
        return None


def _config_of(folder: Path):
    """The run config saved with a checkpoint (None for checkpoints written before configs were saved)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    from .engine.run_config import load_run_config

    return load_run_config(path)


def _save_hf(sd: dict[str, torch.Tensor], cfg, out: Path) -> Path:
    from .models import save_hf
    from .objectives.classify import class_names_of

    if cfg is None:
        raise ExportError("--format hf needs the run config saved with the checkpoint (config.yaml)")
    spec = cfg.model.spec()
    if cfg.objective == "mae":
        return save_hf(sd, spec, "pretrain", out)
    if cfg.objective in ("classify", "distill"):
        shards = (cfg.data.shards or {}).get("shards") if cfg.data.kind == "shards" else None
        names = class_names_of(shards) or class_names_of(cfg.finetune.eval.shards)
        if names is not None and len(names) != cfg.finetune.num_classes:
            names = None
        return save_hf(sd, spec, "classifier", out, num_classes=cfg.finetune.num_classes, class_names=names)
    raise ExportError(f"--format hf: transformers has no {cfg.objective} model; export the safetensors file and "
                      f"fine-tune it (finetune.init), then export the classifier")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmae-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (runs/<name>: uses its newest complete checkpoint) "
                                   "or one checkpoint folder (runs/<name>/checkpoints/step_00001000)")
    p.add_argument("out", help="output .safetensors path, or a folder with --format hf")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors: one fp32 file, official key names (default); hf: a transformers VideoMAE "
                        "folder for VideoMAEForPreTraining / VideoMAEForVideoClassification.from_pretrained")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="model: the trained weights (default); ema: their moving average (runs with "
                        "finetune.ema.enabled)")
    args = p.parse_args(argv)
    from .config import ConfigError
    from .models import HFExportError

    try:
        export(args.run_dir, args.out, args.format, args.weights)
    except (FileNotFoundError, ExportError, HFExportError, ConfigError) as e:
        print(f"vmae-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
