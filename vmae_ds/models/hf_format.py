"""Write our models as HuggingFace transformers VideoMAE folders (`config.json` + `model.safetensors`).

`save_hf(state_dict, spec, "pretrain" | "classifier", out_dir)` -> a folder that
`transformers.VideoMAEForPreTraining` / `VideoMAEForVideoClassification.from_pretrained` loads with no
missing or unexpected keys, and that `checkpoint_import.load_pretrained` reads back to the same state dict:
the renaming is the exact inverse of `checkpoint_import._from_hf`.

Facts of transformers' VideoMAE (5.24) the mapping relies on:
- attention has separate query / key / value Linears; key has no bias, query / value biases are stored under
  the Hub names `attention.attention.q_bias` / `v_bias` (what its save_pretrained writes; 5.x renames them to
  `query.bias` / `value.bias` on load, 4.x reads them as they are). Our fused qkv weight is split in three.
- position tables are fixed sinusoids built by the model (not saved), like ours.
- the pretraining model's encoder ends in `videomae.layernorm` only when use_mean_pooling is false; the
  classifier mean-pools (use_mean_pooling true) and has `fc_norm` + `classifier`, no final encoder norm.
- Known difference, not fixable from the files: transformers builds `fc_norm` and `decoder.norm` with torch's
  default LayerNorm eps 1e-5 (not `layer_norm_eps`), where the official models and ours use 1e-6; its outputs
  therefore differ from ours by a small amount that grows as the normalised features' variance shrinks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from .checkpoint_import import show_keys
from .registry import ModelSpec
from .vit import PretrainVideoMAE, VideoClassifier

__all__ = ["HFExportError", "hf_config_dict", "save_hf"]

Kind = Literal["pretrain", "classifier"]
KINDS = ("pretrain", "classifier")
_ARCH = {"pretrain": "VideoMAEForPreTraining", "classifier": "VideoMAEForVideoClassification"}
_LAYER_NORM_EPS = 1e-6
_SHOW = 8

# per transformer block: (our name prefix, HF name prefix); the fused qkv weight is split separately
_LAYER = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.output.dense."),
    ("attn.q_bias", "attention.attention.q_bias"),
    ("attn.v_bias", "attention.attention.v_bias"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
# outside the blocks, after the classifier's keys got their `encoder.` prefix back; the rest keeps its name
# (encoder_to_decoder, mask_token, decoder.norm, decoder.head, fc_norm)
_TOP = (
    ("encoder.patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
    ("encoder.norm.", "videomae.layernorm."),
    ("head.", "classifier."),
)
_BLOCK = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)")
_HF_BLOCK = {"encoder": "videomae.encoder.layer", "decoder": "decoder.decoder_layers"}


class HFExportError(ValueError):
    """The state dict does not fit the spec / kind, or the output folder cannot be written."""


def hf_config_dict(spec: ModelSpec, kind: Kind, num_classes: int | None = None,
                   class_names: list[str] | None = None) -> dict:
    """The `config.json` content of a transformers VideoMAEConfig describing `spec` as `kind`."""
    _check_kind(kind)
    cfg = {
        "architectures": [_ARCH[kind]],
        "model_type": "videomae",
        "image_size": spec.img_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "num_frames": spec.num_frames,
        "tubelet_size": spec.tubelet_size,
        "hidden_size": spec.dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": int(spec.dim * spec.mlp_ratio),
        "hidden_act": "gelu",  # exact (erf) GELU in transformers, as timm's nn.GELU
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": _LAYER_NORM_EPS,
        "qv_bias": True,  # transformers >= 5 name
        "qkv_bias": True,  # transformers 4 name; 5 maps it onto qv_bias
        "norm_pix_loss": True,
        "dtype": "float32",
    }
    if kind == "pretrain":
        if num_classes is not None or class_names is not None:
            raise HFExportError("num_classes / class_names are only for kind 'classifier', not 'pretrain'")
        cfg.update({
            "use_mean_pooling": False,  # keeps the encoder's final norm (videomae.layernorm)
            "decoder_hidden_size": spec.decoder_dim,
            "decoder_num_hidden_layers": spec.decoder_depth,
            "decoder_num_attention_heads": spec.decoder_heads,
            # the decoder uses the encoder's mlp ratio (ViT-g: int(512 * 48 / 11) = 2234)
            "decoder_intermediate_size": int(spec.decoder_dim * spec.mlp_ratio),
        })
        return cfg
    names = _class_names(num_classes, class_names)
    cfg["use_mean_pooling"] = True
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
    return cfg


def save_hf(state_dict: dict[str, torch.Tensor], spec: ModelSpec, kind: Kind, out_dir: str | Path, *,
            num_classes: int | None = None, class_names: list[str] | None = None) -> Path:
    """Write `out_dir/config.json` and `out_dir/model.safetensors` (fp32); returns `out_dir`.

    state_dict: our layout for `kind` (PretrainVideoMAE / VideoClassifier `state_dict()`), checked in full
    against `spec`. num_classes defaults to the head's rows; class_names (one per class) become id2label.
    """
    _check_kind(kind)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HFExportError(f"{out}: exists and is a file; give a folder for config.json and model.safetensors")
    if kind == "classifier" and num_classes is None:  # the head knows; class_names are checked against it
        head = state_dict.get("head.weight")
        num_classes = int(head.shape[0]) if head is not None else len(class_names) if class_names else None
    config = hf_config_dict(spec, kind, num_classes, class_names)
    _check_state_dict(state_dict, spec, kind, num_classes)
    tensors = to_hf_state_dict(state_dict, kind)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.safetensors.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})  # transformers expects format "pt"
        os.replace(tmp, out / "model.safetensors")  # no half-written weights under the final name
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise HFExportError(f"{out}: cannot write the export: {e.strerror or e}") from None
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], kind: Kind) -> dict[str, torch.Tensor]:
    """Our names -> transformers' names, as fresh contiguous fp32 CPU tensors (no shared storage)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        v = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
        k = "encoder." + key if kind == "classifier" and key.startswith(("patch_embed.", "blocks.")) else key
        m = _BLOCK.fullmatch(k)
        if m is None:
            out[next((hf + k[len(ours):] for ours, hf in _TOP if k.startswith(ours)), k)] = v.contiguous()
            continue
        block = f"{_HF_BLOCK[m[1]]}.{m[2]}."
        if m[3] == "attn.qkv.weight":
            for name, part in zip(("query", "key", "value"), v.chunk(3), strict=True):
                out[f"{block}attention.attention.{name}.weight"] = part.clone()
            continue
        new = next((hf + m[3][len(ours):] for ours, hf in _LAYER if m[3].startswith(ours)), None)
        if new is None:
            raise HFExportError(f"{key}: no transformers VideoMAE counterpart")
        out[block + new] = v.contiguous()
    return out


# ---------------------------------------------------------------- checks

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise HFExportError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _class_names(num_classes: int | None, class_names: list[str] | None) -> list[str]:
    if class_names is None:
        if num_classes is None or num_classes < 1:
            raise HFExportError(f"kind 'classifier' needs num_classes >= 1 or class_names, got {num_classes}")
        return [f"LABEL_{i}" for i in range(num_classes)]  # transformers' own default names
    names = list(class_names)
    if num_classes is not None and len(names) != num_classes:
        raise HFExportError(f"class_names has {len(names)} names for num_classes {num_classes}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise HFExportError(f"class_names must be non-empty strings; got {bad[:_SHOW]!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # label2id would silently keep only one index per name
        raise HFExportError(f"class_names repeat {len(dup)} name(s): {', '.join(dup[:_SHOW])}")
    return names


def _expected(spec: ModelSpec, kind: Kind, num_classes: int | None) -> dict[str, torch.Size]:
    """Names and shapes of our model for `spec` (built on the meta device: no memory, no init cost)."""
    sizes = asdict(spec)
    with torch.device("meta"):
        if kind == "pretrain":
            model = PretrainVideoMAE(**sizes)
        else:
            for k in ("decoder_dim", "decoder_heads", "decoder_depth"):
                sizes.pop(k)
            model = VideoClassifier(num_classes=num_classes or 1, **sizes)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_state_dict(sd: dict[str, torch.Tensor], spec: ModelSpec, kind: Kind, num_classes: int | None) -> None:
    want = _expected(spec, kind, num_classes)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k])}" for k in want if k in sd and sd[k].shape != want[k]]
    problems = [f"{what} ({len(keys)}): {show_keys(keys, _SHOW)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape, got vs spec", shapes))
                if keys]
    other = {"pretrain": ("classifier", "patch_embed.proj.weight"),
             "classifier": ("pretrain", "encoder.patch_embed.proj.weight")}[kind]
    if problems and other[1] in sd:  # the usual mistake: say it before the long key lists
        problems.insert(0, f"it has the keys of a {other[0]} ({other[1]}): use kind {other[0]!r}")
    if problems:
        raise HFExportError(f"state dict does not fit a {kind} of this spec: {'; '.join(problems)}")


