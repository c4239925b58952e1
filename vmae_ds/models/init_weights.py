"""Starting weights of a fine-tuning run: every encoder tensor from the checkpoint, the head as configured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint_import import CheckpointError, load_pretrained, read_canonical
from .registry import get_spec


@torch.no_grad()
def load_classifier_init(model: nn.Module, path: str, head_map: Any = None, fresh_head: bool = False) -> list[str]:
    """Load `path` into a VideoClassifier; report lines. Every encoder tensor must come from the checkpoint.

    The head: kept when the checkpoint's fits; sliced by class name with `head_map` (e.g. K710 -> K400:
    source_classes / target_classes files); left at its fresh init when the checkpoint has none (pretraining)
    or `fresh_head`. A head of another size without either is an error that says so.
    """
    report = load_pretrained(model, path, strict=False)
    head_skipped = [s for s in report.skipped if s.startswith("head.")]
    other = [s for s in report.skipped if not s.startswith("head.")]
    missing = [m for m in report.missing if not m.startswith(("head.", "fc_norm."))]
    if other or missing:
        raise CheckpointError(f"{path} [{report.source_format}] does not fit the classifier: "
                              + "; ".join(f"{k}: {', '.join(v[:6])}" for k, v in
                                          (("unexpected or mis-shaped", other), ("missing", missing)) if v))
    lines = [f"initial weights: {path} [{report.source_format}]: {report.loaded} tensors"
             + (f"; adapted: {'; '.join(report.adapted)}" if report.adapted else "")]
    canon, _ = read_canonical(path)
    has_head = "head.weight" in canon
    if head_map is not None:
        if not has_head:
            raise CheckpointError(f"{path}: finetune.init_head_map is set but the checkpoint has no head to slice")
        from ..data.labels import LabelMap, head_index_map, slice_head

        source = LabelMap.from_file(head_map.source_classes)
        target = LabelMap.from_file(head_map.target_classes)
        if len(source) != canon["head.weight"].shape[0]:
            raise CheckpointError(f"{path}: its head has {canon['head.weight'].shape[0]} classes but "
                                  f"{head_map.source_classes} lists {len(source)}")
        if len(target) != model.head.out_features:
            raise CheckpointError(f"{head_map.target_classes} lists {len(target)} classes, finetune.num_classes is "
                                  f"{model.head.out_features}")
        w, b = slice_head(canon["head.weight"], canon.get("head.bias"), head_index_map(source, target))
        model.head.weight.copy_(w.to(model.head.weight.dtype))
        if b is not None:
            model.head.bias.copy_(b.to(model.head.bias.dtype))
        lines.append(f"head: {len(target)} rows sliced by class name from the checkpoint's {len(source)}-class head")
    elif fresh_head:
        if has_head and not head_skipped:  # a head of the same size was loaded: start it anew
            model.reset_head()
        lines.append("head: fresh (finetune.init_fresh_head)")
    elif head_skipped:
        raise CheckpointError(f"{path}: its head has {canon['head.weight'].shape[0]} classes, this run "
                              f"{model.head.out_features}: set finetune.init_head_map (class-name files of both) to "
                              f"slice it, or finetune.init_fresh_head=true to start a new head")
    else:
        lines.append("head: from the checkpoint" if has_head else "head: fresh (the checkpoint has none)")
    return lines


def exported_config(path: str | Path | None) -> dict | None:
    """The run config (as a dict) that one of our safetensors exports carries in its metadata, else None."""
    p = Path(path) if path else None
    if p is None or p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"]) if "config" in meta else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trained_grid(path: str | None, model_name: str) -> tuple[int, int, int]:
    """The token grid (t, h, w) the weights in `path` were trained at: from the run config our exports carry, or
    an HF folder's config.json; otherwise the registry size of `model_name` (16 x 224, tubelet 2: the grid of
    the authors' released checkpoints; UMT's 8 frames with tubelet 1 give the same 8 x 14 x 14)."""
    sizes: dict = {}
    p = Path(path) if path else None
    try:
        if p is not None and p.is_dir() and (p / "config.json").is_file():
            hf = json.loads((p / "config.json").read_text())
            sizes = {"num_frames": hf.get("num_frames"), "img_size": hf.get("image_size"),
                     "tubelet_size": hf.get("tubelet_size"), "patch_size": hf.get("patch_size")}
        else:
            model = (exported_config(p) or {}).get("model") or {}
            model_name = model.get("name", model_name)
            sizes = {k: model.get(k) for k in ("num_frames", "img_size", "tubelet_size", "patch_size")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        sizes = {}
    spec = get_spec(model_name, **{k: v for k, v in sizes.items() if v})
    side = spec.img_size // spec.patch_size
    return spec.num_frames // spec.tubelet_size, side, side
