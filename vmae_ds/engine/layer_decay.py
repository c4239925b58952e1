"""Layer-wise learning-rate decay for fine-tuning: AdamW groups per (depth, decay / no decay) with an lr_scale.

The BEiT / VideoMAE recipe: the embedding is layer 0, block i is layer i + 1, the pooled norm and the head are
layer depth + 1, and a parameter of layer l trains at lr * layer_decay ** (depth + 1 - l). So the head keeps the
full lr and the patch embedding, furthest from the new task, moves least (ViT-B 0.75: 0.75 ** 13 ~ 0.024).
The train loop applies it: `group["lr"] = lr * group["lr_scale"]`.
"""

from __future__ import annotations

import torch.nn as nn

EMBED_ROOTS = ("patch_embed", "pos_embed", "cls_token", "mask_token")
TOP_ROOTS = ("fc_norm", "norm", "head")


class LayerDecayError(ValueError):
    """A parameter name or setting the layer-decay grouping cannot place."""


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a classifier parameter: 0 embedding, i + 1 for blocks.i, num_layers + 1 for norms and head."""
    parts = name.split(".")
    root = parts[0]
    if root in EMBED_ROOTS:
        return 0
    if root == "blocks":
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) >= num_layers:
            raise LayerDecayError(f"layer decay: parameter {name!r} is not in blocks.0 .. blocks.{num_layers - 1}")
        return int(parts[1]) + 1
    if root in TOP_ROOTS:
        return num_layers + 1
    # An unknown module would silently get some lr; better to stop and name it.
    raise LayerDecayError(f"layer decay: parameter {name!r} belongs to no known layer (expected one of "
                          f"{', '.join(EMBED_ROOTS)}, blocks.<i>, {', '.join(TOP_ROOTS)})")


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                             no_decay_names: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token"),
                             ) -> list[dict]:
    """AdamW groups, one per (layer, decay | no_decay) that has parameters, ordered by layer.

    Each group: params, weight_decay (0 for 1-D params, biases and `no_decay_names`, like
    `optim.param_groups`), lr_scale = layer_decay ** (num_layers + 1 - layer), name 'layer_<l>_<decay|no_decay>'.
    Uses `ds_shape` when present: under ZeRO-3 `zero.Init` a partitioned parameter's `.shape` is (0,).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise LayerDecayError(f"layer decay: {type(model).__name__} has no `blocks` ModuleList to count layers in")
    if not 0.0 < layer_decay <= 1.0:
        raise LayerDecayError(f"layer decay: layer_decay must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise LayerDecayError(f"layer decay: weight_decay must be >= 0, got {weight_decay}")
    num_layers = len(blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        decay = not (len(shape) <= 1 or name.endswith(".bias") or name.split(".")[-1] in no_decay_names)
        lid = layer_id(name, num_layers)
        group = groups.get((lid, decay))
        if group is None:
            group = groups[(lid, decay)] = {
                "params": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
                "name": f"layer_{lid}_{'decay' if decay else 'no_decay'}"}
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]
