"""Frozen CLIP visual tower: the Unmasked Teacher (UMT) target model.

The tower is timm's `VisionTransformer` set up the way timm builds OpenAI CLIP
(`vit_base_patch16_clip_quickgelu_224` and friends): class token, learned absolute position table, `ln_pre`
(timm `pre_norm`), QuickGELU, LayerNorm eps 1e-5, no patch-embedding bias, `ln_post` as the final norm and
`proj` as a bias-free head. Weights come from a local file in OpenAI's key layout (`conv1.weight`,
`class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.{i}.*`, `ln_post`, `proj`), bare or
under `visual.`; nothing is downloaded.

    teacher = load_clip_teacher("ViT-B-16.pt", "clip_b16", num_align_layers=6, device="cuda")
    features, attention = teacher(frames)   # frames (B, 3, 224, 224), CLIP-normalised (CLIP_MEAN / CLIP_STD)
    # features: K tensors (B, N, 512), L2-normalised, oldest aligned block first; attention: (B, N)

Decisions:
- half precision: every weight is cast to `dtype` except the LayerNorms, whose parameters stay float32 and
  which compute in float32 (timm `LayerNormFp32`), as OpenAI's own half-precision CLIP does. Autocast is
  switched off inside the forward, so a caller's autocast region does not change the teacher's numerics.
- class-token attention of the last block is computed in float32 from that block's q and k (cheap: one row),
  so the multinomial draw of UMT's masking does not see bf16-rounded ties.
- another input size: the 2-D patch part of the position table is resampled bicubically (align_corners=False,
  no antialias, like UMT's own CLIP loader), the class position is kept; one table is cached per grid.
- strict: every key of the visual tower must be in the file with its shape; the file's width, depth, patch,
  grid and projection size must equal the requested spec (nothing inferred, nothing resized silently).
"""

from __future__ import annotations

import logging
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import LayerNormFp32
from timm.models.vision_transformer import VisionTransformer

from ..flops import block_flops
from .checkpoint_import import CheckpointError, read_state_dict

__all__ = ["CLIP_MEAN", "CLIP_SPECS", "CLIP_STD", "CLIPSpec", "CLIPTeacher", "TeacherLoadError", "TeacherLoadReport",
           "clip_flops_per_image", "get_clip_spec", "load_clip_teacher", "openai_to_timm",
           "random_openai_state_dict", "save_openai_state_dict", "timm_to_openai"]

logger = logging.getLogger(__name__)

# OpenAI CLIP's input normalisation (RGB, after scaling pixels to [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SHOW = 12  # names listed per kind in an error line


@dataclass(frozen=True)
class CLIPSpec:
    """Shape of a CLIP visual tower. `heads` cannot be read from weights; it comes from the spec only."""

    name: str
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    proj_dim: int
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (f"{self.name} (width {self.width}, {self.layers} layers, {self.heads} heads, patch {self.patch_size}, "
                f"grid {self.grid}x{self.grid}, proj {self.proj_dim})")


CLIP_SPECS: dict[str, CLIPSpec] = {
    "clip_b16": CLIPSpec("clip_b16", width=768, layers=12, heads=12, patch_size=16, image_size=224, proj_dim=512),
    "clip_l14": CLIPSpec("clip_l14", width=1024, layers=24, heads=16, patch_size=14, image_size=224, proj_dim=768),
    "clip_tiny_debug": CLIPSpec("clip_tiny_debug", width=64, layers=4, heads=4, patch_size=8, image_size=32,
                                proj_dim=48),
}


def get_clip_spec(name: str | CLIPSpec, **overrides: int) -> CLIPSpec:
    """A named spec, optionally with fields replaced (e.g. `layers=2` for a cheap full-width test tower)."""
    if isinstance(name, CLIPSpec):
        spec = name
    elif name in CLIP_SPECS:
        spec = CLIP_SPECS[name]
    else:
        raise ValueError(f"unknown CLIP teacher {name!r} (known: {', '.join(CLIP_SPECS)})")
    return replace(spec, **overrides) if overrides else spec


class TeacherLoadError(CheckpointError):
    """A CLIP teacher file that cannot be read, or does not hold the requested visual tower."""


@dataclass(frozen=True)
class TeacherLoadReport:
    path: str
    source_format: str  # "torchscript archive", "safetensors", "torch.save (in 'state_dict', prefix 'module.' ...)"
    prefix: str  # "visual." when the file is a full CLIP model, "" for a bare visual tower
    loaded: int  # tensors loaded into the tower
    ignored: list[str] = field(default_factory=list)  # non-visual keys of a full CLIP file (text tower, ...)

    def summary(self) -> str:
        text = f"{self.path}: {self.loaded} visual tensors loaded from {self.source_format}"
        if self.prefix:
            text += f" under {self.prefix!r}"
        if self.ignored:
            text += f"; {len(self.ignored)} non-visual keys ignored ({_names(self.ignored)})"
        return text


# ----------------------------------------------------------------------------------------- key layouts

_BLOCK_RENAMES = (  # OpenAI resblock suffix -> timm Block suffix
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_TOP_RENAMES = (("conv1.", "patch_embed.proj."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."))
_OPENAI_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    return next((new + key[len(old):] for old, new in pairs if key.startswith(old)), None)


def openai_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare OpenAI visual state dict in timm `VisionTransformer` names (head without bias).

    Keys that are not part of the layout keep their name, so that a strict load reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        m = _OPENAI_BLOCK.fullmatch(key)
        if m:
            new = _rename(m[2], _BLOCK_RENAMES)
            out[f"blocks.{m[1]}.{new}" if new else key] = v
        elif key == "class_embedding" and v.ndim == 1:
            out["cls_token"] = v.reshape(1, 1, -1)
        elif key == "positional_embedding" and v.ndim == 2:
            out["pos_embed"] = v.unsqueeze(0)
        elif key == "proj" and v.ndim == 2:
            out["head.weight"] = v.t()  # OpenAI multiplies x @ proj: (width, out); nn.Linear holds (out, width)
        else:
            out[_rename(key, _TOP_RENAMES) or key] = v
    return out


def timm_to_openai(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `openai_to_timm` for the tower's own keys."""
    inverse_block = tuple((new, old) for old, new in _BLOCK_RENAMES)
    inverse_top = tuple((new, old) for old, new in _TOP_RENAMES)
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        m = _TIMM_BLOCK.fullmatch(key)
        if m:
            out[f"transformer.resblocks.{m[1]}.{_rename(m[2], inverse_block) or m[2]}"] = v
        elif key == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = v.squeeze(0)
        elif key == "head.weight":
            out["proj"] = v.t()
        else:
            out[_rename(key, inverse_top) or key] = v
    return out


# ----------------------------------------------------------------------------------------- the model

class CLIPTeacher(nn.Module):
    """Frozen CLIP visual tower returning UMT's alignment targets and the class-token attention.

    Built with uninitialised weights (`device="meta"` by default): use `load_clip_teacher` to get a usable one.
    """

    def __init__(self, spec: str | CLIPSpec, num_align_layers: int = 6, device: str | torch.device = "meta"):
        super().__init__()
        self.spec = get_clip_spec(spec)
        if not 1 <= num_align_layers <= self.spec.layers:
            raise ValueError(f"num_align_layers must be in [1, {self.spec.layers}] for {self.spec.name}, "
                             f"got {num_align_layers}")
        self.num_align_layers = num_align_layers
        s = self.spec
        self.vit = VisionTransformer(
            img_size=s.image_size, patch_size=s.patch_size, num_classes=s.proj_dim, embed_dim=s.width,
            depth=s.layers, num_heads=s.heads, mlp_ratio=s.mlp_ratio, qkv_bias=True, pre_norm=True,
            norm_layer=partial(LayerNormFp32, eps=1e-5), act_layer="quick_gelu", weight_init="skip", device=device)
        self.vit.head = nn.Linear(s.width, s.proj_dim, bias=False, device=device)  # CLIP's `proj`
        self.vit.patch_embed.strict_img_size = False  # other sizes are allowed; the position table is resampled
        self._check_last_block_is_plain()
        self._pos_tables: dict[tuple, torch.Tensor] = {}
        self.load_report: TeacherLoadReport | None = None  # set by load_clip_teacher

    def _check_last_block_is_plain(self) -> None:
        # `_last_block` re-implements timm's Block.forward for this configuration only; fail loudly if timm
        # ever gives the block parts that the re-implementation would skip.
        blk = self.vit.blocks[-1]
        plain = (blk.ls1, blk.ls2, blk.drop_path1, blk.drop_path2, blk.attn.q_norm, blk.attn.k_norm, blk.attn.norm)
        if not all(isinstance(m, nn.Identity) for m in plain) or getattr(blk.attn, "gate", None) is not None:
            raise TypeError("timm Block has layer scale / drop path / q-k norm / gating; CLIPTeacher cannot "
                            "reproduce its forward")

    def train(self, mode: bool = True) -> CLIPTeacher:
        return super().train(False)  # frozen teacher: a parent's .train() must not switch it

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.patch_embed.proj.weight.dtype

    @property
    def trained_grid(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, width): the trained table itself at the trained grid, else a cached resample."""
        table = self.vit.pos_embed
        if (grid_h, grid_w) == self.trained_grid:
            return table
        key = (grid_h, grid_w, table.device, table.dtype)
        if key not in self._pos_tables:
            self._pos_tables[key] = _resample_positions(table.detach(), self.trained_grid, (grid_h, grid_w))
        return self._pos_tables[key]

    def _check_frames(self, frames: torch.Tensor) -> tuple[int, int]:
        p = self.spec.patch_size
        if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
            raise ValueError(f"CLIP teacher input must be float (B, 3, H, W), got {tuple(frames.shape)} "
                             f"{frames.dtype}")
        h, w = frames.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"CLIP teacher input {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def _last_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm Block.forward of the last block, also returning the class token's attention to the patches."""
        blk = self.vit.blocks[-1]
        attn = blk.attn
        b, length, dim = x.shape
        qkv = attn.qkv(blk.norm1(x)).reshape(b, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, dim)
        x = x + attn.proj(out)
        x = x + blk.mlp(blk.norm2(x))
        scores = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, 1 + N)
        cls_attention = scores.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)  # softmax over all tokens, then patches
        return x, cls_attention

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """frames (B, 3, H, W), CLIP-normalised -> (K x (B, N, proj_dim) L2-normalised float32, (B, N) float32)."""
        grid = self._check_frames(frames)
        vit = self.vit
        first_aligned = self.spec.layers - self.num_align_layers
        with torch.autocast(device_type=frames.device.type, enabled=False):
            x = vit.patch_embed(frames.to(self.dtype))
            x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_table(*grid)
            x = vit.norm_pre(x)
            aligned = []
            for i, blk in enumerate(vit.blocks[:-1]):
                x = blk(x)
                if i >= first_aligned:
                    aligned.append(x)
            x, attention = self._last_block(x)
            aligned.append(x)
            # ln_post is per token, so dropping the class token first is exact and saves the projection.
            features = [F.normalize(vit.head(vit.norm(y[:, 1:])).float(), dim=-1) for y in aligned]
        return features, attention


def _resample_positions(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic resample of the patch positions over the 2-D grid; the class position is kept as is."""
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    grid = patch_pos.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(table.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# ----------------------------------------------------------------------------------------- loading

def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _is_torchscript(path: Path) -> bool:
    # a TorchScript archive is a zip holding `<name>/constants.pkl`; a torch.save zip has none
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not path.exists():
        raise TeacherLoadError(f"{path}: no such CLIP teacher file")
    if not path.is_file():
        raise TeacherLoadError(f"{path}: not a file (expected a CLIP state dict, open_clip checkpoint, "
                               f"safetensors file or TorchScript archive)")
    if _is_torchscript(path):
        try:  # read by torch's C++ TorchScript loader (no Python pickle); the archive's code is never run here
            with warnings.catch_warnings():  # OpenAI released CLIP as TorchScript; torch now flags jit as deprecated
                warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TeacherLoadError(f"{path}: unreadable TorchScript archive: {first}") from e
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, "torchscript archive"
    fmt = "safetensors" if _is_safetensors(path) else "torch.save file"
    try:
        sd, notes = read_state_dict(path)
    except CheckpointError as e:
        text = str(e)
        raise TeacherLoadError(text if str(path) in text else f"{path}: {text}") from e
    return sd, fmt + (f" ({', '.join(notes)})" if notes else "")


def _split_visual(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The visual tower's keys without prefix, the prefix, and the keys ignored (a full CLIP's text tower)."""
    if not any(k.startswith("visual.") for k in sd):
        return sd, "", []
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    return visual, "visual.", sorted(k for k in sd if not k.startswith("visual."))


def _file_architecture(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """What the file's shapes say about the tower (only what can be read off the weights)."""
    arch: dict[str, object] = {}
    if (conv := sd.get("conv1.weight")) is not None and conv.ndim == 4:
        arch["width"], arch["patch"] = conv.shape[0], conv.shape[-1]
    blocks = {int(m[1]) for k in sd if (m := _OPENAI_BLOCK.fullmatch(k))}
    if blocks:
        arch["layers"] = max(blocks) + 1
    if (pos := sd.get("positional_embedding")) is not None and pos.ndim == 2:
        side = round((pos.shape[0] - 1) ** 0.5)
        arch["grid"] = f"{side}x{side}" if side * side == pos.shape[0] - 1 else f"{pos.shape[0] - 1} tokens"
    if (proj := sd.get("proj")) is not None and proj.ndim == 2:
        arch["proj"] = proj.shape[1]
    return arch


def _layout_hint(keys: list[str]) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return " (this looks like a HuggingFace transformers CLIP; convert it to the OpenAI layout first)"
    if any(k.startswith(("patch_embed.", "blocks.", "cls_token")) for k in keys):
        return " (this looks like a timm ViT; convert it to the OpenAI layout first)"
    return ""


def _check_layout(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], spec: CLIPSpec,
                  path: Path) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    mismatched = [f"{k} {tuple(sd[k].shape)} (expected {tuple(shape)})"
                  for k, shape in expected.items() if k in sd and sd[k].shape != shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: not an OpenAI-layout CLIP visual tower matching {spec.describe()}"
             f"{_layout_hint(unexpected)}"]
    arch = _file_architecture(sd)
    want = {"width": spec.width, "layers": spec.layers, "patch": spec.patch_size,
            "grid": f"{spec.grid}x{spec.grid}", "proj": spec.proj_dim}
    differ = [f"{k} {arch[k]} (expected {want[k]})" for k in want if k in arch and arch[k] != want[k]]
    if differ:
        lines.append(f"  architecture differs: the file has {', '.join(differ)}")
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(f"  {kind} ({len(items)}): {_names(items)}")
    raise TeacherLoadError("\n".join(lines))


def _expected_openai_shapes(teacher: CLIPTeacher) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in timm_to_openai(teacher.vit.state_dict()).items()}


def _finish(teacher: CLIPTeacher, device: str | torch.device, dtype: torch.dtype) -> CLIPTeacher:
    teacher.to(device=device, dtype=dtype)
    for m in teacher.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()  # see the module docstring: LayerNorms stay float32
    teacher.requires_grad_(False)
    return teacher.eval()


def load_clip_teacher(path: str | Path, name: str | CLIPSpec, *, num_align_layers: int = 6,
                      image_size: int | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> CLIPTeacher:
    """A frozen CLIP teacher (eval mode, no gradients) with weights from an OpenAI-layout file.

    path: a `.pt`/`.pth` state dict (`torch.load(weights_only=True)`), an open_clip checkpoint (`state_dict`,
    `module.` prefix), a `.safetensors` file, or an OpenAI TorchScript archive; bare tower keys or a full CLIP
    under `visual.` (the other keys are ignored and listed in `teacher.load_report`).
    name: `clip_b16`, `clip_l14`, `clip_tiny_debug`, or a `CLIPSpec`.
    image_size: the side the teacher will be fed (e.g. 196 for UMT-L's /14 teacher); its position table is
    prepared now. Default: the spec's trained size. Other sizes still work (resampled and cached on first use).
    Raises TeacherLoadError (a ValueError) naming the file on any unreadable or non-matching file.
    """
    path = Path(path)
    teacher = CLIPTeacher(name, num_align_layers, device="meta")
    spec = teacher.spec
    if image_size is not None and (image_size <= 0 or image_size % spec.patch_size):
        raise ValueError(f"image_size must be a positive multiple of {spec.name}'s patch size "
                         f"{spec.patch_size}, got {image_size}")
    raw, source_format = _read(path)
    sd, prefix, ignored = _split_visual(raw)
    _check_layout(sd, _expected_openai_shapes(teacher), spec, path)
    teacher.to_empty(device="cpu")
    with torch.no_grad():
        teacher.vit.load_state_dict({k: v.float() for k, v in openai_to_timm(sd).items()}, strict=True)
    _finish(teacher, device, dtype)
    if image_size is not None:
        teacher.position_table(image_size // spec.patch_size, image_size // spec.patch_size)
    teacher.load_report = TeacherLoadReport(str(path), source_format, prefix, len(sd), ignored)
    logger.info("CLIP teacher %s: %s", spec.name, teacher.load_report.summary())
    return teacher


# ----------------------------------------------------------------------------------------- FLOPs and demo weights

def clip_flops_per_image(name: str | CLIPSpec, image_size: int, *, num_align_layers: int = 6) -> int:
    """Forward FLOPs of one image through the teacher (multiply-add = 2; what vmae_ds.flops counts).

    Counted: patch conv, every block's linear layers and two attention matmuls (class token included), the
    class-token attention row of the last block, and `proj` on the patch tokens of the K aligned layers.
    """
    spec = get_clip_spec(name)
    if image_size <= 0 or image_size % spec.patch_size:
        raise ValueError(f"image_size must be a positive multiple of {spec.patch_size}, got {image_size}")
    if not 1 <= num_align_layers <= spec.layers:
        raise ValueError(f"num_align_layers must be in [1, {spec.layers}] for {spec.name}, got {num_align_layers}")
    patches = (image_size // spec.patch_size) ** 2
    tokens = patches + 1
    embed = 2 * patches * spec.width * 3 * spec.patch_size**2
    blocks = spec.layers * block_flops(tokens, spec.width, int(spec.width * spec.mlp_ratio))
    cls_row = 2 * tokens * spec.width  # q_cls k^T over all heads
    proj = num_align_layers * 2 * patches * spec.width * spec.proj_dim
    return embed + blocks + cls_row + proj


def random_openai_state_dict(name: str | CLIPSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random float32 weights in OpenAI layout (for tests and the CPU demo; no global RNG touched).

    Every tensor is non-trivial (LayerNorm scales near 1, small non-zero biases) so that a wrong key mapping
    changes the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = _expected_openai_shapes(CLIPTeacher(name, num_align_layers=1, device="meta"))
    sd: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if re.search(r"ln_\w+\.weight$", key):
            sd[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            sd[key] = 0.05 * noise
        elif key in ("class_embedding", "positional_embedding"):
            sd[key] = noise * shape[-1] ** -0.5  # OpenAI's init scale: width ** -0.5
        elif key == "proj":
            sd[key] = noise * shape[0] ** -0.5  # (width, out): fan-in is the first dim
        else:
            sd[key] = noise * shape[1:].numel() ** -0.5  # Linear (out, in) and conv (out, 3, p, p): fan-in
    return sd


def save_openai_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as `.safetensors` (by suffix) or with `torch.save`; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(dict(sd), path)
    return path
