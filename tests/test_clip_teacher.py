"""CLIP teacher for UMT: strict OpenAI-layout loading from every source, and outputs equal to two references.

References: timm's own CLIP build (`vit_*_clip_quickgelu_224`, weights via timm's `_convert_openai_clip`), and
a small OpenAI-architecture tower written here (nn.MultiheadAttention with OpenAI's key names), whose
head-averaged attention weights are what UMT's teacher reads.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import QuickGELU, resample_abs_pos_embed
from timm.models.vision_transformer import _convert_openai_clip
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vmae_ds.models.clip_teacher import (
    CLIP_MEAN,
    CLIP_SPECS,
    CLIP_STD,
    CLIPTeacher,
    TeacherLoadError,
    clip_flops_per_image,
    get_clip_spec,
    load_clip_teacher,
    openai_to_timm,
    random_openai_state_dict,
    save_openai_state_dict,
)

TINY = "clip_tiny_debug"  # width 64, 4 layers, 4 heads, patch 8, 32 px (4x4 grid), proj 48
TIMM_NAMES = {"clip_b16": "vit_base_patch16_clip_quickgelu_224", "clip_l14": "vit_large_patch14_clip_quickgelu_224"}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _frames(spec, batch: int = 2, size: int | None = None, seed: int = 1) -> torch.Tensor:
    size = size or spec.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _timm_clip(spec, img_size: int | None = None) -> nn.Module:
    """timm's CLIP tower, its arguments overridden to `spec`'s sizes (the quickgelu variant = OpenAI's)."""
    return timm.create_model(
        "vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=img_size or spec.image_size,
        patch_size=spec.patch_size, embed_dim=spec.width, depth=spec.layers, num_heads=spec.heads,
        num_classes=spec.proj_dim).eval()


def _timm_loaded(spec, sd: dict, img_size: int | None = None) -> nn.Module:
    model = _timm_clip(spec, img_size)
    converted = _convert_openai_clip({f"visual.{k}": v for k, v in sd.items()}, model)
    if img_size and img_size != spec.image_size:  # timm's own resample; antialias off as UMT's loader
        side = img_size // spec.patch_size
        converted["pos_embed"] = resample_abs_pos_embed(converted["pos_embed"], [side, side], num_prefix_tokens=1,
                                                        interpolation="bicubic", antialias=False)
    model.load_state_dict(converted, strict=True)
    return model


def _timm_targets(model: nn.Module, frames: torch.Tensor, k: int) -> list[torch.Tensor]:
    inter = model.forward_intermediates(frames, indices=k, output_fmt="NLC", intermediates_only=True)
    return [F.normalize(model.head(model.norm(y)), dim=-1) for y in inter]


# ------------------------------------------------------------------- an OpenAI-architecture reference tower

class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x (L, B, width)
        h = self.ln_1(x)
        out, weights = self.attn(h, h, h, need_weights=True)  # weights: (B, L, L), averaged over heads
        assert weights is not None
        x = x + out
        return x + self.mlp(self.ln_2(x)), weights


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResBlock(width, heads) for _ in range(layers)])


class _OpenAIVisual(nn.Module):
    def __init__(self, spec):
        super().__init__()
        w, p = spec.width, spec.patch_size
        self.conv1 = nn.Conv2d(3, w, p, p, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(spec.grid**2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = _Transformer(w, spec.layers, spec.heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.zeros(w, spec.proj_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(all layers' L2-normalised projected patch tokens (layers, B, N, proj), last class attention (B, N))."""
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).transpose(0, 1)
        outs: list[torch.Tensor] = []
        weights = torch.empty(0)
        for blk in self.transformer.resblocks:
            x, weights = blk(x)
            outs.append(x.transpose(0, 1))
        feats = self.ln_post(torch.stack(outs)[:, :, 1:]) @ self.proj
        return feats / torch.linalg.vector_norm(feats, dim=-1, keepdim=True), weights[:, 0, 1:]


class _OpenAICLIP(nn.Module):
    """Full CLIP shape: the visual tower under `visual.`, plus text-tower keys whose names collide with it."""

    def __init__(self, spec):
        super().__init__()
        self.visual = _OpenAIVisual(spec)
        self.positional_embedding = nn.Parameter(torch.randn(7, 32))
        self.token_embedding = nn.Embedding(50, 32)
        self.transformer = _Transformer(32, 1, 2)
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, spec.proj_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.visual(image)


def _openai_clip(spec, sd: dict) -> _OpenAICLIP:
    model = _OpenAICLIP(spec).eval()
    model.visual.load_state_dict(sd, strict=True)
    return model


# ------------------------------------------------------------------- architecture equals timm's

@pytest.mark.parametrize("name", ["clip_b16", "clip_l14"])
def test_build_equals_timm_clip_at_full_size(name):
    spec = CLIP_SPECS[name]
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=spec.proj_dim)
    ours = CLIPTeacher(name, device="meta")
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.vit.state_dict().items()}
    assert ref_shapes.pop("head.bias") == (spec.proj_dim,)  # timm's head carries a zero bias; CLIP's proj none
    assert our_shapes == ref_shapes
    assert ours.vit.patch_embed.proj.bias is None and ref.patch_embed.proj.bias is None
    for a, b in zip(ours.vit.modules(), ref.modules(), strict=True):
        if isinstance(b, nn.LayerNorm):
            assert a.eps == b.eps == 1e-5
        if isinstance(b, QuickGELU):
            assert isinstance(a, QuickGELU)
    assert isinstance(ours.vit.blocks[0].mlp.act, QuickGELU)
    assert (spec.image_size // spec.patch_size) ** 2 + 1 == ref.pos_embed.shape[1]


def test_clip_normalisation_constants_are_openai_ones():
    assert CLIP_MEAN == pytest.approx(OPENAI_CLIP_MEAN, abs=1e-8)
    assert CLIP_STD == pytest.approx(OPENAI_CLIP_STD, abs=1e-8)


def test_key_conversion_equals_timm_converter():
    spec = get_clip_spec(TINY)
    sd = random_openai_state_dict(TINY, seed=3)
    ours = openai_to_timm(sd)
    theirs = _convert_openai_clip({f"visual.{k}": v for k, v in sd.items()}, _timm_clip(spec))
    assert not theirs.pop("head.bias").any()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------- outputs equal the references

@pytest.mark.parametrize("name,overrides,k", [
    (TINY, {}, 3),
    (TINY, {}, 4),  # every layer aligned
    ("clip_b16", {"layers": 2}, 2),  # real width and head dim (64)
    ("clip_l14", {"layers": 2}, 1),  # real width, head dim 64, patch 14
])
def test_features_and_attention_equal_timm(tmp_path, name, overrides, k):
    spec = get_clip_spec(name, **overrides)
    sd = random_openai_state_dict(spec, seed=0)
    path = save_openai_state_dict(sd, tmp_path / "clip.pt")
    teacher = load_clip_teacher(path, spec, num_align_layers=k, dtype=torch.float32)
    ref = _timm_loaded(spec, sd)
    frames = _frames(spec)
    features, attention = teacher(frames)

    expected = _timm_targets(ref, frames, k)
    assert len(features) == k
    for ours, theirs in zip(features, expected, strict=True):
        assert ours.shape == (2, spec.grid**2, spec.proj_dim) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2, spec.grid**2))

    # class-token attention, computed independently from timm's last block q and k
    captured = {}
    handle = ref.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.update(qkv=o))
    ref(frames)
    handle.remove()
    heads, head_dim = spec.heads, spec.width // spec.heads
    q, kk, _ = captured["qkv"].reshape(2, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ kk.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)  # (B, heads, L, L)
    torch.testing.assert_close(attention, probs[:, :, 0, 1:].mean(1), rtol=1e-5, atol=1e-6)
    assert attention.shape == (2, spec.grid**2) and (attention.sum(-1) < 1).all()  # class token's share left out


def test_features_and_attention_equal_openai_architecture(tmp_path):
    spec = get_clip_spec(TINY)
    sd = random_openai_state_dict(TINY, seed=5)
    teacher = load_clip_teacher(save_openai_state_dict(sd, tmp_path / "v.pt"), TINY, num_align_layers=3,
                                dtype=torch.float32)
    frames = _frames(spec, batch=3)
    features, attention = teacher(frames)
    ref_feats, ref_attn = _openai_clip(spec, sd)(frames)
    for i, ours in enumerate(features):  # oldest aligned layer first: blocks 1, 2, 3 of 0..3
        torch.testing.assert_close(ours, ref_feats[spec.layers - 3 + i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention, ref_attn, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- every source layout loads

def _write_source(kind: str, sd: dict, spec, tmp_path):
    if kind == "bare_pt":
        return save_openai_state_dict(sd, tmp_path / "visual.pt"), ""
    if kind == "full_clip_pth":  # a whole CLIP: visual.* plus text-tower keys with colliding names
        path = tmp_path / "clip_full.pth"
        torch.save(_openai_clip(spec, sd).state_dict(), path)
        return path, "visual."
    if kind == "open_clip":
        full = _openai_clip(spec, sd).state_dict()
        ckpt = {"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in full.items()},
                "optimizer": {"state": {}, "param_groups": []}}
        path = tmp_path / "epoch_32.pt"
        torch.save(ckpt, path)
        return path, "visual."
    if kind == "safetensors":
        return save_openai_state_dict(sd, tmp_path / "visual.safetensors"), ""
    if kind == "torchscript":  # like OpenAI's released ViT-B-16.pt: a scripted full model, half precision
        path = tmp_path / "ViT-tiny.pt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save)` is deprecated", FutureWarning)
            torch.jit.save(torch.jit.script(_openai_clip(spec, sd).half()), str(path))
        return path, "visual."
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bare_pt", "full_clip_pth", "open_clip", "safetensors", "torchscript"])
def test_every_source_loads_strictly_to_the_same_teacher(tmp_path, kind):
    spec = get_clip_spec(TINY)
    sd = random_openai_state_dict(TINY, seed=7)
    path, prefix = _write_source(kind, sd, spec, tmp_path)
    teacher = load_clip_teacher(path, TINY, num_align_layers=2, dtype=torch.float32)
    report = teacher.load_report
    assert report.prefix == prefix and report.loaded == len(sd)
    if prefix:  # text tower keys are named, not silently dropped
        assert {"positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
                "transformer.resblocks.0.attn.in_proj_weight"} <= set(report.ignored)
        assert f"{len(report.ignored)} non-visual keys ignored" in report.summary()
    else:
        assert report.ignored == []
    want = torch.cat([v.flatten() for v in openai_to_timm(sd).values()])
    if kind == "torchscript":
        want = want.half().float()  # the archive holds fp16 weights
        assert report.source_format == "torchscript archive"
    got = torch.cat([teacher.vit.state_dict()[k].flatten() for k in openai_to_timm(sd)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------- errors name the file and the keys

def _message(path, name=TINY) -> str:
    with pytest.raises(TeacherLoadError) as e:
        load_clip_teacher(path, name, num_align_layers=2)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_text_and_random_files_are_refused_naming_the_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n" * 20)
    assert str(text) in _message(text) and "not a checkpoint" in _message(text)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    assert str(noise) in _message(noise)
    assert "no such" in _message(tmp_path / "absent.pt")
    assert "not a file" in _message(tmp_path)


def test_missing_keys_are_listed_one_line_per_kind(tmp_path):
    sd = random_openai_state_dict(TINY)
    del sd["ln_post.bias"], sd["transformer.resblocks.3.mlp.c_fc.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["proj"] = torch.zeros(64, 40)
    path = save_openai_state_dict(sd, tmp_path / "broken.pt")
    lines = _message(path).splitlines()
    assert str(path) in lines[0]
    assert any(line.strip().startswith("architecture differs") and "proj 40 (expected 48)" in line for line in lines)
    missing = next(line for line in lines if line.strip().startswith("missing (2)"))
    assert "ln_post.bias" in missing and "transformer.resblocks.3.mlp.c_fc.weight" in missing
    assert any(line.strip().startswith("unexpected (1): extra.weight") for line in lines)
    assert any(line.strip().startswith("shape mismatch (1): proj (64, 40) (expected (64, 48))") for line in lines)


def test_another_width_says_which_dimensions_differ(tmp_path):
    path = save_openai_state_dict(random_openai_state_dict(TINY), tmp_path / "tiny.pt")
    msg = _message(path, "clip_b16")
    assert str(path) in msg and "clip_b16" in msg
    arch = next(line for line in msg.splitlines() if "architecture differs" in line)
    for part in ("width 64 (expected 768)", "layers 4 (expected 12)", "patch 8 (expected 16)",
                 "grid 4x4 (expected 14x14)", "proj 48 (expected 512)"):
        assert part in arch


def test_a_timm_layout_file_gets_a_hint(tmp_path):
    path = tmp_path / "timm_vit.safetensors"
    save_file(_timm_clip(get_clip_spec(TINY)).state_dict(), str(path))
    msg = _message(path)
    assert "looks like a timm ViT" in msg and "missing (" in msg and "unexpected (" in msg


def test_bad_arguments_and_inputs(tmp_path):
    path = save_openai_state_dict(random_openai_state_dict(TINY), tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="num_align_layers"):
        load_clip_teacher(path, TINY, num_align_layers=5)
    with pytest.raises(ValueError, match="unknown CLIP teacher"):
        load_clip_teacher(path, "clip_h14")
    with pytest.raises(ValueError, match="multiple of"):
        load_clip_teacher(path, TINY, num_align_layers=2, image_size=30)
    teacher = load_clip_teacher(path, TINY, num_align_layers=2)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        teacher(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        teacher(torch.randn(1, 32, 32))


# ------------------------------------------------------------------- precision, freezing, positions

def test_bf16_teacher_returns_float32_close_to_fp32(tmp_path):
    spec = get_clip_spec(TINY)
    path = save_openai_state_dict(random_openai_state_dict(TINY, seed=2), tmp_path / "v.pt")
    bf16 = load_clip_teacher(path, TINY, num_align_layers=2)  # default dtype bf16
    fp32 = load_clip_teacher(path, TINY, num_align_layers=2, dtype=torch.float32)
    frames = _frames(spec, batch=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast region must not matter
        features, attention = bf16(frames)
    ref_features, ref_attention = fp32(frames)
    assert [f.shape for f in features] == [(3, 16, 48)] * 2 and attention.shape == (3, 16)
    assert all(f.dtype == torch.float32 for f in features) and attention.dtype == torch.float32
    for ours, ref in zip(features, ref_features, strict=True):
        assert (ours * ref).sum(-1).min() > 0.99  # cosine similarity per token
    torch.testing.assert_close(attention, ref_attention, rtol=0.1, atol=5e-3)
    assert bf16.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.vit.norm.weight.dtype == torch.float32  # LayerNorms kept float32


def test_teacher_is_frozen_and_stays_in_eval(tmp_path):
    path = save_openai_state_dict(random_openai_state_dict(TINY), tmp_path / "v.pt")
    teacher = load_clip_teacher(path, TINY, num_align_layers=4)
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Linear(2, 2)}).train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parent["student"].training
    with torch.enable_grad():
        features, attention = teacher(_frames(get_clip_spec(TINY)))
    assert not features[0].requires_grad and not attention.requires_grad


@pytest.mark.parametrize("size", [24, 48])  # 3x3 (downsampled table) and 6x6 (upsampled)
def test_position_interpolation_equals_timm_resample(tmp_path, size):
    spec = get_clip_spec(TINY)
    sd = random_openai_state_dict(TINY, seed=4)
    path = save_openai_state_dict(sd, tmp_path / "v.pt")
    teacher = load_clip_teacher(path, TINY, num_align_layers=2, image_size=size, dtype=torch.float32)
    side = size // spec.patch_size
    table = teacher.position_table(side, side)
    assert table is teacher.position_table(side, side)  # cached per size (prepared at load by image_size)
    assert table.shape == (1, side * side + 1, spec.width)
    torch.testing.assert_close(table[:, 0], teacher.vit.pos_embed[:, 0], rtol=0, atol=0)  # class position kept
    assert teacher.position_table(4, 4) is teacher.vit.pos_embed  # trained size: the original table itself

    frames = _frames(spec, size=size)
    features, attention = teacher(frames)
    ref = _timm_loaded(spec, sd, img_size=size)
    for ours, theirs in zip(features, _timm_targets(ref, frames, 2), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert features[0].shape == (2, side * side, spec.proj_dim) and attention.shape == (2, side * side)


def test_non_square_input_runs(tmp_path):
    path = save_openai_state_dict(random_openai_state_dict(TINY), tmp_path / "v.pt")
    teacher = load_clip_teacher(path, TINY, num_align_layers=1, dtype=torch.float32)
    features, attention = teacher(torch.randn(2, 3, 32, 48))
    assert features[0].shape == (2, 24, 48) and attention.shape == (2, 24)


# ------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("name,overrides,size,k", [
    (TINY, {}, 32, 4),
    (TINY, {}, 48, 1),
    ("clip_b16", {"layers": 1}, 224, 1),
    ("clip_l14", {"layers": 1}, 196, 1),
])
def test_flops_equal_flop_counter(tmp_path, name, overrides, size, k):
    spec = get_clip_spec(name, **overrides)
    path = save_openai_state_dict(random_openai_state_dict(spec), tmp_path / "v.pt")
    teacher = load_clip_teacher(path, spec, num_align_layers=k, dtype=torch.float32)
    frames = torch.randn(2, 3, size, size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math: SDPA as matmuls
        teacher(frames)
    assert counter.get_total_flops() == 2 * clip_flops_per_image(spec, size, num_align_layers=k)


def test_flops_of_vit_b16_are_about_the_known_17_6_gmacs():
    # ViT-B/16 at 224 is widely quoted as 17.6 GMACs; the teacher adds proj on 6 layers and one attention row
    macs = clip_flops_per_image("clip_b16", 224) / 2
    proj = 6 * 196 * 768 * 512
    assert abs((macs - proj) / 1e9 - 17.6) < 0.1
    assert clip_flops_per_image("clip_l14", 196) < clip_flops_per_image("clip_l14", 224)
