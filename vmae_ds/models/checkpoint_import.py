"""Import pretrained weights into `PretrainVideoMAE`, `VideoClassifier` or a bare `VideoEncoder`.

Sources: official VideoMAE v1 / V2 pretraining and fine-tuned checkpoints, our own exports (same names),
DeepSpeed / DDP / torch.compile wrappers and prefixes, and HuggingFace transformers VideoMAE checkpoints.
Only safe formats are read: safetensors, or `torch.load(weights_only=True)`; never arbitrary pickle.

Pipeline: read -> unwrap (`model` / `module` / `state_dict`, `module.` / `_orig_mod.`) -> rename to one
canonical layout (official pretraining names: `encoder.*`, `decoder.*`, `encoder_to_decoder`, `mask_token`,
plus `fc_norm` / `head`) -> fit to the target model (drop parts it lacks, adapt position tables and
the patch embedding) -> check names and shapes -> load.

Decisions:
- pretraining -> classifier: `encoder.norm` is dropped and `fc_norm` / `head` keep their fresh init,
  as official fine-tuning does (its mean-pooling model has no `norm`; fc_norm starts fresh).
- position tables: a saved fixed sinusoid (any length) is dropped, the model keeps its own; a learned
  table is copied, or resampled trilinearly over (t, h, w) to the model's grid, into the model's
  (non-persistent) `pos_embed` buffer. It stays a buffer: not trained and not in our state_dict.
- patch embedding of another tubelet size, or a 2-D image one: error unless `inflate_patch_embed=True`,
  which sums the kernel over time and spreads it evenly over the model's tubelet (I3D-style inflation:
  a static clip gives the same embedding).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from .pos_embed import sinusoid_table
from .vit import PretrainVideoMAE, VideoEncoder

__all__ = ["CheckpointError", "LoadReport", "load_pretrained", "read_canonical", "read_state_dict"]

_WRAPPERS = ("model", "module", "state_dict")
# Parts a target may lack; checkpoint keys under them are dropped when the target has no such part.
_OPTIONAL_PARTS = {"decoder", "mask_token", "encoder_to_decoder", "fc_norm", "head", "norm", "align_heads"}
_HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HF_LAYER = (  # per transformer layer: (HF name prefix, ours); q/k/v weights are fused separately
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("attention.attention.q_bias", "attn.q_bias"),  # files on the Hub / written by save_pretrained
    ("attention.attention.v_bias", "attn.v_bias"),
    ("attention.attention.query.bias", "attn.q_bias"),  # in-memory names in transformers >= 5
    ("attention.attention.value.bias", "attn.v_bias"),
)
_HF_TOP = (
    ("embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
    ("embeddings.position_embeddings", "encoder.pos_embed"),
    ("layernorm.", "encoder.norm."),
    ("classifier.", "head."),
    ("position_embeddings", "decoder.pos_embed"),
)
_SHOW = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or does not fit the model."""


@dataclass
class LoadReport:
    path: str
    source_format: str  # e.g. "videomae-pretrain (in 'model', prefix 'module.' stripped)", "hf-classification"
    loaded: int  # model entries written (parameters and position tables)
    ignored: list[str] = field(default_factory=list)  # checkpoint keys not used, with the reason
    adapted: list[str] = field(default_factory=list)  # entries changed on the way (fused, resampled, ...)
    missing: list[str] = field(default_factory=list)  # model keys left as initialised
    skipped: list[str] = field(default_factory=list)  # strict=False only: unexpected / shape-mismatched keys


# ---------------------------------------------------------------- reading

def _is_safetensors(path: Path) -> bool:
    # layout: 8-byte little-endian header length, then a JSON header starting with '{'
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _unpickle_reason(text: str) -> str:
    """The reason torch's weights_only unpickler gives, without its advice (file an issue / allowlist)."""
    head, sep, tail = text.partition("WeightsUnpickler error:")
    if not sep:
        return (head.strip().splitlines() or ["not a pickle"])[0]
    reason = " ".join(tail.strip().split("\n\n")[0].split())  # e.g. 'Unsupported operand 107' (no pickle)
    return reason.split(". Please use", 1)[0].rstrip(".") or "unsupported content"


def _read_one(path: Path) -> Any:
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            return load_file(path)
        # argparse.Namespace: official checkpoints save their `args` next to the weights; a plain attribute bag
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = _unpickle_reason(str(e))
        if "Unsupported global" not in why:  # not code the unpickler refused: the bytes are no pickle at all
            raise CheckpointError(f"{path}: not a checkpoint: neither safetensors nor a torch.save file "
                                  f"({why})") from e
        raise CheckpointError(f"{path}: refused: not a safetensors file and not loadable with torch.load("
                              f"weights_only=True); arbitrary pickle is never executed ({why.strip()})") from e
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # an empty file raises with no message
        first = first.split(" In PyTorch 2.6", 1)[0]  # drop torch's advice to load without weights_only
        raise CheckpointError(f"{path}: unreadable or corrupted checkpoint: {first}") from e
    except (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:  # e.g. a text file
        raise CheckpointError(f"{path}: not a checkpoint: neither safetensors nor a torch.save file "
                              f"(torch.load: {type(e).__name__} {e})") from e


def _resolve(path: Path) -> list[Path]:
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        return [path]
    for name in _HF_FILES:
        if (path / name).exists():
            if name.endswith(".index.json"):  # sharded HF checkpoint
                shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
                return [path / s for s in shards]
            return [path / name]
    if (path / "checkpoints").is_dir() or path.name.startswith("step_"):  # a vmae-pretrain run or checkpoint
        raise CheckpointError(f"{path}: a DeepSpeed training run/checkpoint; export it first: "
                              f"vmae-export {path} weights.safetensors")
    raise CheckpointError(f"{path}: directory holds none of {', '.join(_HF_FILES)}")


def _unwrap(obj: Any, notes: list[str]) -> dict[str, torch.Tensor]:
    for _ in range(4):  # e.g. {"module": {...}} from DeepSpeed, {"model": {...}, "optimizer": ...} official
        if not isinstance(obj, Mapping):
            break
        inner = next((w for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        notes.append(f"in {inner!r}")
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in sd):
        notes.append("prefix 'module.' stripped")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any("_orig_mod." in k for k in sd):  # torch.compile; a compiled submodule puts it mid-key
        notes.append("'_orig_mod.' stripped")
        sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a checkpoint file / HF directory, unwrapped, plus notes on what was unwrapped."""
    notes: list[str] = []
    sd: dict[str, torch.Tensor] = {}
    for p in _resolve(Path(path)):
        sd.update(_unwrap(_read_one(p), notes))
    if not sd:
        raise CheckpointError(f"{path}: no tensors found")
    return sd, list(dict.fromkeys(notes))


# ---------------------------------------------------------------- renaming to the canonical layout

def _from_hf(sd: dict[str, torch.Tensor], adapted: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        k = key.removeprefix("videomae.")  # base-model prefix; absent in a bare VideoMAEModel file
        m = re.match(r"(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)", k)
        if m:
            block = f"{m[1].split('.')[0]}.blocks.{m[2]}."
            rest = m[3]
            proj = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if proj and (proj[2] == "weight" or proj[1] == "key"):
                qkv.setdefault(block, {})[proj[1] + "." + proj[2]] = v
                continue
            new = next((ours + rest[len(hf):] for hf, ours in _HF_LAYER if rest.startswith(hf)), rest)
            out[block + new] = v
            continue
        out[next((ours + k[len(hf):] for hf, ours in _HF_TOP if k.startswith(hf)), k)] = v
    for block, parts in qkv.items():
        kb = parts.pop("key.bias", None)
        if kb is not None and kb.abs().max() > 0:  # our attention (and the official one) has no k bias
            raise CheckpointError(f"{block}: checkpoint has a non-zero key bias, which this model cannot hold")
        try:
            out[block + "attn.qkv.weight"] = torch.cat([parts[n + ".weight"] for n in ("query", "key", "value")])
        except KeyError as e:
            raise CheckpointError(f"{block}: attention lacks {e.args[0]}") from None
    if qkv:
        adapted.append(f"attn.qkv.weight = cat(query, key, value) in {len(qkv)} layers")
    return out


def _canonical(sd: dict[str, torch.Tensor], adapted: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    if any("patch_embeddings.projection" in k for k in sd):
        out = _from_hf(sd, adapted)
        kind = "hf-pretraining" if "mask_token" in out else "hf-classification" if "head.weight" in out else "hf-model"
    elif "encoder.patch_embed.proj.weight" in sd:
        # the official pretraining model keeps its decoder table at top level as `pos_embed`
        out = {("decoder.pos_embed" if k == "pos_embed" else k): v for k, v in sd.items()}
        kind = "videomae-pretrain"
    elif "patch_embed.proj.weight" in sd:
        enc = ("patch_embed.", "blocks.", "norm.", "pos_embed")
        out = {("encoder." + k if k.startswith(enc) else k): v for k, v in sd.items()}
        kind = "videomae-finetune" if "head.weight" in sd else "videomae-encoder"
    else:
        raise CheckpointError(f"no VideoMAE patch embedding found; first keys: {show_keys(sorted(sd))}")
    # a model built without q/v biases (qkv_bias=False) saves none: the equivalent is zeros
    if not any(k.endswith(("attn.q_bias", "attn.v_bias")) for k in out):
        for k in [k for k in out if k.endswith("attn.qkv.weight")]:
            base, dim = k.removesuffix("qkv.weight"), out[k].shape[1]
            out[base + "q_bias"] = out[base + "v_bias"] = torch.zeros(dim, dtype=out[k].dtype)
            adapted.append(f"{base}q_bias/v_bias = 0 (checkpoint has none)")
    return out, kind


def read_canonical(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's tensors in the canonical (official pretraining) layout, and the format it came in."""
    raw, _ = read_state_dict(path)
    return _canonical(raw, [])


# ---------------------------------------------------------------- fitting to the target

def show_keys(keys: list[str], limit: int = _SHOW) -> str:
    """Keys grouped over block indices (`blocks.*.x (x12)`), at most `limit` groups (for one-line errors)."""
    groups: dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+\.", ".*.", k)
        groups[g] = groups.get(g, 0) + 1
    shown = [g if n == 1 else f"{g} (x{n})" for g, n in list(groups.items())[:limit]]
    more = len(groups) - limit
    return ", ".join(shown) + (f", ... and {more} more" if more > 0 else "")


def _grid_of(n: int, model_grid: tuple[int, int, int], source_grid: tuple[int, int, int] | None) -> tuple[int, ...]:
    if source_grid is not None:
        if source_grid[0] * source_grid[1] * source_grid[2] != n:
            raise CheckpointError(f"source_grid {source_grid} does not hold {n} position-table rows")
        return source_grid
    t, h, w = model_grid
    if n % (h * w) == 0:  # another frame count, same resolution
        return n // (h * w), h, w
    side = round((n / t) ** 0.5) if n % t == 0 else 0
    if side * side * t == n:  # another (square) resolution, same frame count
        return t, side, side
    raise CheckpointError(f"cannot infer the token grid of a {n}-row position table for a model grid "
                          f"{model_grid}; pass source_grid=(t, h, w)")


def _fit_pos_embed(key: str, table: torch.Tensor, buf: torch.Tensor, grid: tuple[int, int, int],
                   source_grid: tuple[int, int, int] | None, ignored: list[str],
                   adapted: list[str]) -> torch.Tensor | None:
    dim = buf.shape[-1]
    table = table.float().reshape(-1, table.shape[-1])
    if table.shape[-1] != dim:
        raise CheckpointError(f"{key}: position table width {table.shape[-1]} != model width {dim}")
    if torch.allclose(table, sinusoid_table(table.shape[0], dim)[0], atol=1e-4):
        ignored.append(f"{key} (fixed sinusoid table; the model builds its own)")
        return None
    if table.shape[0] == buf.shape[1]:
        adapted.append(f"{key} (learned table copied into the buffer)")
        return table.unsqueeze(0)
    src = _grid_of(table.shape[0], grid, source_grid)
    # align_corners=True: end tokens keep their values and linear trends stay exactly linear
    vol = table.reshape(1, *src, dim).permute(0, 4, 1, 2, 3)
    out = F.interpolate(vol, size=grid, mode="trilinear", align_corners=True)
    adapted.append(f"{key} (learned table resampled {tuple(src)} -> {tuple(grid)})")
    return out.permute(0, 2, 3, 4, 1).reshape(1, -1, dim)


def _fit_patch_embed(key: str, w: torch.Tensor, target: torch.Tensor, inflate: bool,
                     adapted: list[str]) -> torch.Tensor:
    if w.shape == target.shape:
        return w
    if w.ndim == target.ndim and w.shape[2] == target.shape[2]:
        return w  # same tubelet: a spatial / channel / width mismatch is reported with the other shapes
    what = "a 2-D (image) patch embedding" if w.ndim == 4 else f"tubelet size {w.shape[2]}"
    if not inflate:
        raise CheckpointError(f"{key}: checkpoint has {what} {tuple(w.shape)}, model needs tubelet size "
                              f"{target.shape[2]} {tuple(target.shape)}; pass inflate_patch_embed=True to "
                              f"inflate it (kernel summed over time, spread evenly over the tubelet)")
    t = target.shape[2]
    flat = w if w.ndim == 4 else w.sum(2)
    adapted.append(f"{key} (inflated {what} -> tubelet size {t})")
    return (flat.unsqueeze(2) / t).repeat(1, 1, t, 1, 1)


def load_pretrained(model: nn.Module, path: str | Path, *, strict: bool = True,
                    inflate_patch_embed: bool = False,
                    source_grid: tuple[int, int, int] | None = None) -> LoadReport:
    """Load a checkpoint file (or HF directory) into `model` (PretrainVideoMAE, VideoClassifier, VideoEncoder).

    strict=True raises CheckpointError listing missing / unexpected / shape-mismatched keys; strict=False
    loads what fits and lists the rest in the report (still raises if nothing at all fits).
    `source_grid` gives the (t, h, w) grid of a learned position table when it cannot be inferred.
    """
    if not isinstance(model, (PretrainVideoMAE, VideoEncoder)):
        raise TypeError(f"load_pretrained supports PretrainVideoMAE and VideoEncoder/VideoClassifier, "
                        f"got {type(model).__name__}")
    try:
        return _load(model, path, strict, inflate_patch_embed, source_grid)
    except CheckpointError as e:  # every error names the file
        if str(path) in e.args[0]:
            raise
        raise CheckpointError(f"{path}: {e.args[0]}") from e


def _load(model: nn.Module, path: str | Path, strict: bool, inflate_patch_embed: bool,
          source_grid: tuple[int, int, int] | None) -> LoadReport:
    raw, notes = read_state_dict(path)
    ignored: list[str] = []
    adapted: list[str] = []
    canon, kind = _canonical(raw, adapted)
    source_format = kind + (f" ({', '.join(notes)})" if notes else "")

    if not isinstance(model, PretrainVideoMAE):  # encoder keys without `encoder.`
        canon = {k.removeprefix("encoder."): v for k, v in canon.items()}
    own = model.state_dict()
    parts = {k.split(".")[0] for k in own}
    sd: dict[str, torch.Tensor] = {}
    for k, v in canon.items():
        if k.split(".")[0] in _OPTIONAL_PARTS and k.split(".")[0] not in parts:
            ignored.append(f"{k} (no '{k.split('.')[0]}' in {type(model).__name__})")
        else:
            sd[k] = v

    # position tables are non-persistent buffers: handled here, not by load_state_dict
    buffers = dict(model.named_buffers())
    tables: dict[str, torch.Tensor] = {}
    for k in [k for k in sd if k.endswith("pos_embed") and k in buffers]:
        fitted = _fit_pos_embed(k, sd.pop(k), buffers[k], model.grid, source_grid, ignored, adapted)
        if fitted is not None:
            tables[k] = fitted
    for k in [k for k in sd if k.endswith("patch_embed.proj.weight") and k in own]:
        sd[k] = _fit_patch_embed(k, sd[k], own[k], inflate_patch_embed, adapted)

    has_head = any(k.startswith("head.") for k in canon)
    fresh = [k for k in own if k not in sd and k.split(".")[0] in ("fc_norm", "head") and not has_head]
    missing = [k for k in own if k not in sd and k not in fresh]
    unexpected = [k for k in sd if k not in own]
    mismatch = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): {show_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): {show_keys(unexpected)}")
    if mismatch:
        shown = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatch[:_SHOW]]
        problems.append(f"shape mismatch ({len(mismatch)}): " + "; ".join(shown)
                        + (f"; ... and {len(mismatch) - _SHOW} more" if len(mismatch) > _SHOW else ""))
    usable = {k: v for k, v in sd.items() if k in own and k not in mismatch}
    if problems and (strict or not usable):
        raise CheckpointError(f"{path} [{source_format}] does not fit {type(model).__name__}:\n  "
                              + "\n  ".join(problems))

    model.load_state_dict(usable, strict=False)
    with torch.no_grad():
        for k, table in tables.items():
            buffers[k].copy_(table.to(buffers[k].dtype))
    return LoadReport(path=str(path), source_format=source_format, loaded=len(usable) + len(tables),
                      ignored=ignored, adapted=adapted,
                      missing=[f"{k} (fresh init)" for k in fresh] + missing,
                      skipped=[f"{k} (unexpected)" for k in unexpected] + [f"{k} (shape)" for k in mismatch])
