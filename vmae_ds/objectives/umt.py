"""Unmasked Teacher (UMT) stage 1: align the student's visible tokens with a frozen CLIP image model.

Frames go through the teacher independently (no grad, bf16), at the resolution that gives the teacher the
student's token grid (UMT-L: a /14 teacher sees 196 px, resized bicubically, so its 14 x 14 grid matches a /16
student at 224). As the authors, the teacher gets the student's ImageNet-normalised frames as they are
(`umt.teacher_normalize: clip` re-normalises them to CLIP's statistics) and clips are flipped (`umt.flip`).
With `umt.mask: attention` the teacher's class-token attention chooses, per frame, which tokens the student
keeps (a multinomial draw without replacement); tube and random masks are the options.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device, pixel_stats
from ..flops import encoder_flops
from ..losses import alignment_loss
from ..masking import TokenGrid, attention_visible, select_tokens
from ..models.clip_teacher import CLIP_MEAN, CLIP_STD, clip_flops_per_image, get_clip_spec, load_clip_teacher
from .base import Objective
from .mae import loader_extras


class UMTObjective(Objective):
    name = "umt"
    job = "pretrain"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.uc = cfg.umt
        self.spec = cfg.model.spec()
        self.teacher_spec = get_clip_spec(self.uc.teacher.name)
        s = self.spec
        if s.tubelet_size != 1:
            raise ConfigError(f"objective umt aligns every frame with the image teacher: model.tubelet_size must "
                              f"be 1, got {s.tubelet_size}")
        if self.uc.align_layers > min(s.depth, self.teacher_spec.layers):
            raise ConfigError(f"umt.align_layers {self.uc.align_layers} exceeds the student's depth {s.depth} or "
                              f"the teacher's {self.teacher_spec.layers} layers")
        side = s.img_size // s.patch_size
        self.teacher_size = side * self.teacher_spec.patch_size  # the teacher's grid equals the student's

    def grid(self) -> TokenGrid:
        s = self.spec
        return TokenGrid(s.num_frames, s.img_size // s.patch_size, s.img_size // s.patch_size)

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        from ..models.umt import UMTStudent

        build = {k: v for k, v in self.cfg.model.overrides().items() if k in ("attention", "drop_path_rate")}
        sizes = {k: getattr(self.spec, k) for k in ("img_size", "patch_size", "num_frames", "tubelet_size", "dim",
                                                     "depth", "num_heads", "mlp_ratio")}
        return UMTStudent(**sizes, teacher_dim=self.teacher_spec.proj_dim, align_layers=self.uc.align_layers,
                          **build)

    def setup(self, device: torch.device) -> list[str]:
        super().setup(device)
        self.stats = pixel_stats(device)
        # ImageNet-normalised student input -> CLIP-normalised teacher input, one affine map per channel
        im_m, im_s = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        cl_m, cl_s = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        self.to_clip = (im_s / cl_s, (im_m - cl_m) / cl_s)
        t = self.uc.teacher
        self.teacher = load_clip_teacher(t.path, t.name, num_align_layers=self.uc.align_layers,
                                         image_size=self.teacher_size, device=device, dtype=self.dtype)
        inputs = "the student's ImageNet-normalised frames" if self.uc.teacher_normalize == "student" else \
            "frames re-normalised to CLIP's mean / std"
        return [f"teacher: {self.teacher.load_report.summary()}; sees {self.teacher_size} px frames "
                f"({self.grid().h}x{self.grid().w} tokens, as the student), {inputs}"]

    # ---------------------------------------------------------------- data
    def build_loader(self, rank: int, world: int) -> Any:
        cfg = self.cfg
        masked = self.uc.mask != "attention"
        if cfg.data.kind == "synthetic":
            from ..engine.synthetic import SyntheticLoader

            masks = {"encoder": self.uc.mask, "encoder_ratio": self.uc.mask_ratio, "decoder": "none",
                     "decoder_ratio": 0.0} if masked else None
            return SyntheticLoader.for_run(cfg, rank, world, frames=self.spec.num_frames, size=self.spec.img_size,
                                           grid=self.grid(), masks=masks)
        from ..data import MultiScaleCrops, PretrainLoader, default_mask_fn

        mask_fn = default_mask_fn(self.grid(), encoder_kind=self.uc.mask, encoder_ratio=self.uc.mask_ratio,
                                  decoder_kind="none") if masked else None
        shards = cfg.shards_config()
        return PretrainLoader(shards, batch_size=cfg.optim.batch_size * cfg.data.num_sample, rank=rank,
                              world_size=world, seed=cfg.seed, mask_fn=mask_fn,
                              transform=MultiScaleCrops(shards, flip=self.uc.flip), **loader_extras(cfg))

    def to_device(self, batch: dict) -> dict:
        video = batch["video"].to(self.device, non_blocking=True)
        out = {"video": normalize_on_device(video, torch.float32, self.stats)}
        if "encoder_mask" in batch:
            out["visible"] = select_tokens(batch["encoder_mask"], None).visible.to(self.device, non_blocking=True)
        return out

    # ---------------------------------------------------------------- step
    def teacher_targets(self, video: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """K teacher feature maps (B, T*N, D) in the student's token order, and attention (B, T, N)."""
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        if self.uc.teacher_normalize == "clip":
            scale, shift = self.to_clip
            frames = frames * scale + shift
        if (h, w) != (self.teacher_size, self.teacher_size):
            frames = F.interpolate(frames, size=(self.teacher_size,) * 2, mode=self.uc.teacher_resize,
                                   align_corners=False)
        with torch.no_grad():
            feats, attn = self.teacher(frames.to(self.dtype))
        n = attn.shape[-1]
        return [f.reshape(b, t * n, -1) for f in feats], attn.reshape(b, t, n)

    def loss(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video = batch["video"]
        targets, attn = self.teacher_targets(video)
        visible = batch.get("visible")
        if visible is None:
            visible = attention_visible(attn, self.uc.mask_ratio)
        preds = model(video.to(self.dtype), visible)
        chosen = [t.gather(1, visible.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in targets]
        return alignment_loss(preds, chosen), {}

    def probe_features(self, model: Any, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ..probe.features import encoder_features

        return encoder_features(model.encoder, video.to(self.dtype))

    def flops_per_sample(self) -> dict[str, float]:
        return umt_flops(self.spec, self.teacher_spec, self.teacher_size, self.uc.align_layers, self.uc.mask_ratio,
                         self.uc.mask)


def umt_flops(spec: Any, teacher_spec: Any, teacher_size: int, align_layers: int, mask_ratio: float,
              mask: str = "attention") -> dict[str, float]:
    """Per clip: 'model' = student forward + backward (3x forward: the patch embedding and the blocks of the
    visible tokens, the K heads), 'teacher' = its forward on every frame."""
    t, side = spec.num_frames // spec.tubelet_size, spec.img_size // spec.patch_size
    n = side * side
    visible = t * (n - int(mask_ratio * n)) if mask != "random" else t * n - int(mask_ratio * t * n)
    heads = align_layers * 2 * visible * spec.dim * teacher_spec.proj_dim
    student = encoder_flops(spec, visible, embedded=visible) + heads
    teacher = spec.num_frames * clip_flops_per_image(teacher_spec, teacher_size, num_align_layers=align_layers)
    return {"model": 3.0 * student, "teacher": float(teacher)}
