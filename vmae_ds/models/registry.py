"""Model zoo: named sizes from the VideoMAE V2 paper plus a tiny debug flavour for tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch.nn as nn

from .vit import PretrainVideoMAE, VideoClassifier


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    decoder_dim: int
    decoder_heads: int
    decoder_depth: int = 4
    img_size: int = 224
    num_frames: int = 16
    tubelet_size: int = 2


MODELS: dict[str, ModelSpec] = {
    # tiny: 4 frames of 32x32 -> 2 x 4 x 4 = 32 tokens; drives every fast test and the CPU demo
    "vit_tiny_debug": ModelSpec(48, 2, 3, 4.0, 8, 32, 2, 1, img_size=32, num_frames=4),
    "vit_small_patch16": ModelSpec(384, 12, 6, 4.0, 16, 192, 3),
    "vit_base_patch16": ModelSpec(768, 12, 12, 4.0, 16, 384, 6),
    "vit_large_patch16": ModelSpec(1024, 24, 16, 4.0, 16, 512, 8),
    "vit_huge_patch16": ModelSpec(1280, 32, 16, 4.0, 16, 512, 8),
    "vit_giant_patch14": ModelSpec(1408, 40, 16, 48 / 11, 14, 512, 8),
}
ALIASES = {"S": "vit_small_patch16", "B": "vit_base_patch16", "L": "vit_large_patch16",
           "H": "vit_huge_patch16", "g": "vit_giant_patch14", "debug": "vit_tiny_debug"}

_SPEC_FIELDS = set(ModelSpec.__dataclass_fields__)
_BUILD_ONLY = {"attention", "drop_path_rate", "embed_visible_only", "decoder_mlp_align"}


def list_models() -> list[str]:
    return list(MODELS)


def get_spec(name: str, **overrides) -> ModelSpec:
    """The spec for `name` (or its alias S/B/L/H/g/debug) with size overrides applied."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    bad = set(overrides) - _SPEC_FIELDS
    if bad:
        raise ValueError(f"unknown model override(s) {sorted(bad)}; allowed: {sorted(_SPEC_FIELDS)}")
    spec = replace(MODELS[name], **overrides)
    if spec.img_size % spec.patch_size or spec.num_frames % spec.tubelet_size:
        raise ValueError(f"img_size {spec.img_size} / num_frames {spec.num_frames} must be multiples of "
                         f"patch_size {spec.patch_size} / tubelet_size {spec.tubelet_size}")
    return spec


def _split(overrides: dict) -> tuple[dict, dict]:
    build = {k: overrides.pop(k) for k in list(overrides) if k in _BUILD_ONLY}
    return overrides, build


def create_pretrain_model(name: str, **overrides) -> PretrainVideoMAE:
    """Pretraining encoder + decoder. Overrides: any ModelSpec field, `attention`, `drop_path_rate`,
    `embed_visible_only`, `decoder_mlp_align` (False / 1: the authors' way of running the same model).

    Build under `with torch.device("meta"):` to size a model without memory; call
    `model.to_empty(device=...)` then `model.init_weights()` to materialise it.
    """
    spec_over, build = _split(dict(overrides))
    spec = get_spec(name, **spec_over)
    return PretrainVideoMAE(**asdict(spec), **build)


def create_classifier(name: str, num_classes: int, **overrides) -> VideoClassifier:
    """Fine-tuning classifier sharing the encoder architecture (no decoder)."""
    spec_over, build = _split(dict(overrides))
    head_drop = spec_over.pop("head_drop_rate", 0.0)
    spec = asdict(get_spec(name, **spec_over))
    for k in ("decoder_dim", "decoder_heads", "decoder_depth"):
        spec.pop(k)
    return VideoClassifier(num_classes=num_classes, head_drop_rate=head_drop, **spec, **build)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
