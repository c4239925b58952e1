"""The Unmasked Teacher (UMT) student: the project's ViT encoder with tubelet 1, plus one alignment head per
aligned block (facts section 7).

Only visible tokens run through the encoder. The outputs of its last K blocks go through the encoder's final
norm, get the fixed sin-cos position of their token added back, and each through its head: Linear(student
dim -> CLIP dim) -> LayerNorm -> L2 normalisation. Parameter names: `encoder.*` (as the VideoMAE models, so a
trained student loads into a VideoClassifier for fine-tuning) and `align_heads.{k}.*`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import KernelChoice
from ..masking import gather_tokens
from .vit import CheckpointFn, VideoEncoder, _init_pretrain


class AlignHead(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.norm(self.proj(x)), dim=-1)


class UMTStudent(nn.Module):
    def __init__(self, *, img_size: int, patch_size: int, num_frames: int, tubelet_size: int, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, teacher_dim: int, align_layers: int, attention: str = "auto",
                 drop_path_rate: float = 0.0, embed_visible_only: bool = True, **_decoder_sizes: int):
        super().__init__()
        if not 0 < align_layers <= depth:
            raise ValueError(f"align_layers {align_layers} must be in [1, depth {depth}]")
        self.kernel = KernelChoice(attention)
        self.encoder = VideoEncoder(img_size=img_size, patch_size=patch_size, num_frames=num_frames,
                                    tubelet_size=tubelet_size, dim=dim, depth=depth, num_heads=num_heads,
                                    mlp_ratio=mlp_ratio, kernel=self.kernel, drop_path_rate=drop_path_rate,
                                    embed_visible_only=embed_visible_only)
        self.grid = self.encoder.grid
        self.align_layers = align_layers
        self.align_heads = nn.ModuleList(AlignHead(dim, teacher_dim) for _ in range(align_layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.apply(_init_pretrain)  # xavier Linears, LayerNorm 1/0 (through apply: zero.Init gathers there)

    def set_activation_checkpointing(self, mode: str = "none", num_blocks: int = 0,
                                     fn: CheckpointFn | None = None) -> None:
        depth = len(self.encoder.blocks)
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"activation checkpointing mode must be none|full|selective, got {mode!r}")
        if mode == "selective" and not 0 < num_blocks <= depth:
            raise ValueError(f"selective checkpointing needs 0 < num_blocks <= {depth}, got {num_blocks}")
        self.encoder.num_ckpt_blocks = {"none": 0, "full": depth, "selective": num_blocks}[mode]
        if fn is not None:
            self.encoder.ckpt_fn = fn

    def forward(self, video: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """video (B, C, T, H, W); visible (B, Nv) token ids, ascending. Returns K tensors (B, Nv, teacher dim),
        L2-normalised, oldest aligned block first."""
        _, inter = self.encoder.forward_features(video, visible, keep_last=self.align_layers)
        pos = gather_tokens(self.encoder.pos_embed.expand(video.shape[0], -1, -1), visible)
        return [head(self.encoder.norm(h) + pos.to(h.dtype)) for head, h in zip(self.align_heads, inter)]
