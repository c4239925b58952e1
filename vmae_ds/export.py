"""`vmae-export RUN_DIR OUT.safetensors`: consolidate a sharded DeepSpeed checkpoint into one fp32 file.

The file holds the pretraining model's state dict (official key names: encoder.blocks.0.attn.qkv.weight,
decoder.head.weight, mask_token, ...) in float32, loadable with `vmae_ds.models.load_pretrained` into a
PretrainVideoMAE or, keeping only the encoder, a VideoClassifier for fine-tuning. Runs on CPU, no
process group needed: it reads the fp32 master weights from the ZeRO optimizer shards.
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


class ExportError(ValueError):
    """The output cannot be written; the message names the path."""


def export(run_or_ckpt: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if out.is_dir():  # checked before the (long) consolidation
        raise ExportError(f"{out} is a folder: give the output file, e.g. {out / 'model.safetensors'}")
    folder = find_checkpoint(run_or_ckpt)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder of {out}: {e.strerror or e}") from None
    sd = consolidate(folder)
    meta = {"format": "vmae_ds.pretrain", "checkpoint": str(folder)}
    cfg = folder / "config.yaml"
    if cfg.exists():
        import yaml
        meta["config"] = json.dumps(yaml.safe_load(cfg.read_text()))
    try:
        save_file(sd, str(out), metadata=meta)
    except Exception as e:  # safetensors' I/O errors are its own type, not OSError
        raise ExportError(f"cannot write {out}: {str(e).strip().splitlines()[0]}") from None
    n = sum(v.numel() for v in sd.values())
    print(f"exported {folder} -> {out}: {len(sd)} tensors, {n / 1e6:.2f} M parameters, fp32")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmae-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (runs/<name>: uses its newest complete checkpoint) "
                                   "or one checkpoint folder (runs/<name>/checkpoints/step_00001000)")
    p.add_argument("out", help="output .safetensors path")
    args = p.parse_args(argv)
    try:
        export(args.run_dir, args.out)
    except (FileNotFoundError, ExportError) as e:
        print(f"vmae-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
