"""Analytic FLOPs of the VideoMAE V2 models: plain arithmetic on a model's sizes, importing nothing else of the
project (each objective adds up its own count from these functions; `vmae_ds.flops_cli` prints the tables).

Convention: a multiply-add is 2 FLOPs, as `torch.utils.flop_counter.FlopCounterMode` counts; only matmuls,
linear layers, attention's two batched matmuls and the patch embedding are counted (norms, softmax, GELU,
biases and residual adds are not). The VideoMAE V2 paper's "GFLOPs" are multiply-adds: use `.macs`.

The counts follow what the model runs: by default the patch embedding of the visible tokens only (the model's
`embed_visible_only`); `embed_visible_only=False` is the authors' conv over every token, which the paper
counts. The decoder MLP's padding to an aligned width (the model's `decoder_mlp_align`) is work on zeros:
left out by default, as checkpoint recompute is, so MFU counts model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DECODER_MODES = ("running_cell", "none", "random", "frame")
# a running cell of 2 x 2 tokens keeps 1, 2 or 3 of its 4 (vmae_ds.masking.RUNNING_CELL_RATIOS, a test checks)
RUNNING_CELL_RATIOS = (0.25, 0.5, 0.75)
# VideoMAE V2 (arXiv 2303.16727), ViT-g per clip, encoder-only -> dual masking, in multiply-adds.
PAPER_G_MACS = (263.93e9, 241.61e9)
# VideoMAE V2 decoder-masking ablation, ViT-B: no decoder masking vs running cell 50% (multiply-adds).
PAPER_B_MACS = (35.48e9, 25.87e9)


class Sizes(Protocol):
    """A model's sizes (vmae_ds.models.ModelSpec has them)."""

    dim: int
    depth: int
    mlp_ratio: float
    patch_size: int
    decoder_dim: int
    decoder_depth: int
    img_size: int
    num_frames: int
    tubelet_size: int


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs (multiply-add = 2) of one forward pass, split by part.

    encoder: patch embedding + blocks (+ classifier pooling, which costs nothing here);
    decoder: encoder_to_decoder + decoder blocks + norm; head: the decoder's pixel head
    (or the classification head for `classifier_flops`).
    """

    encoder: int
    decoder: int
    head: int

    @property
    def total(self) -> int:
        return self.encoder + self.decoder + self.head

    @property
    def macs(self) -> int:
        """Multiply-adds, the unit the VideoMAE papers call 'FLOPs'."""
        return self.total // 2

    def scaled(self, factor: int) -> FlopsBreakdown:
        return FlopsBreakdown(self.encoder * factor, self.decoder * factor, self.head * factor)


def grid_of(spec: Sizes) -> tuple[int, int, int]:
    """Token grid (T, H, W) after tubelet embedding."""
    side = spec.img_size // spec.patch_size
    return spec.num_frames // spec.tubelet_size, side, side


def aligned(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (the padded MLP width)."""
    return -(-n // multiple) * multiple


def block_flops(tokens: int, dim: int, mlp_hidden: int, attention_included: bool = True) -> int:
    """One pre-norm transformer block on `tokens` tokens: qkv, (q k^T, attn v), proj, fc1, fc2."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_hidden)
    # Two (n x n x head_dim) batched matmuls per head; summed over heads that is n*n*dim each.
    attention = 2 * 2 * tokens * tokens * dim if attention_included else 0
    return linear + attention


def embed_flops(spec: Sizes, tokens: int, in_chans: int = 3) -> int:
    """The tubelet embedding of `tokens` tokens (a conv over all of them, or the visible ones' matmul)."""
    return 2 * tokens * spec.dim * in_chans * spec.tubelet_size * spec.patch_size**2


def encoder_visible_tokens(spec: Sizes, encoder_ratio: float, encoder_mask: str = "tube") -> int:
    """Visible tokens: tube: per frame H*W - int(ratio * H*W), times T; random: N - int(ratio * N)."""
    if not 0.0 <= encoder_ratio < 1.0:  # like vmae_ds.masking: a ratio of 1 would leave no visible token
        raise ValueError(f"encoder mask ratio must be in [0, 1), got {encoder_ratio}")
    t, h, w = grid_of(spec)
    if encoder_mask == "tube":
        return t * (h * w - int(encoder_ratio * h * w))
    if encoder_mask == "random":
        return t * h * w - int(encoder_ratio * t * h * w)
    raise ValueError(f"encoder_mask must be tube or random, got {encoder_mask!r}")


def decoder_kept_tokens(spec: Sizes, decoder_mode: str, encoder_ratio: float, decoder_ratio: float,
                        encoder_mask: str = "tube") -> int:
    """Tokens the decoder predicts (mask tokens appended after the visible ones), per clip."""
    t, h, w = grid_of(spec)
    n = t * h * w
    if decoder_mode == "none":  # encoder-only masking: predict every encoder-hidden token
        return n - encoder_visible_tokens(spec, encoder_ratio, encoder_mask)
    if decoder_mode == "running_cell":
        if decoder_ratio not in RUNNING_CELL_RATIOS:
            raise ValueError(f"running_cell decoder_ratio must be one of {RUNNING_CELL_RATIOS}, got {decoder_ratio}")
        if h % 2 or w % 2:
            raise ValueError(f"running_cell needs an even token grid, got {h}x{w}")
        return n // 4 * (4 - int(4 * decoder_ratio))
    if decoder_mode == "random":
        return n - int(decoder_ratio * n)
    if decoder_mode == "frame":
        if decoder_ratio != 0.5 or t % 2:
            raise ValueError(f"frame decoder mask needs ratio 0.5 and an even T, got {decoder_ratio}, T={t}")
        return n // 2
    raise ValueError(f"decoder_mode must be one of {DECODER_MODES}, got {decoder_mode!r}")


def encoder_flops(spec: Sizes, tokens: int, *, embedded: int, attention_included: bool = True) -> int:
    """Patch embedding of `embedded` tokens + the blocks on `tokens` tokens."""
    hidden = int(spec.dim * spec.mlp_ratio)
    return embed_flops(spec, embedded) + spec.depth * block_flops(tokens, spec.dim, hidden, attention_included)


def pretrain_flops(spec: Sizes, *, decoder_mode: str = "running_cell", encoder_ratio: float = 0.9,
                   decoder_ratio: float = 0.5, attention_included: bool = True, encoder_mask: str = "tube",
                   embed_visible_only: bool = True, decoder_mlp_align: int = 1) -> FlopsBreakdown:
    """Forward FLOPs of one clip through the pretraining model.

    decoder_mode: running_cell | random | frame (dual masking) or none (encoder-only masking);
    encoder_mask: tube (VideoMAE) | random; attention_included=False drops the two attention matmuls;
    embed_visible_only=False counts the authors' conv over every token; decoder_mlp_align > 1 counts the
    padded decoder MLP the GEMMs run (1: the model's own width).
    """
    t, h, w = grid_of(spec)
    vis = encoder_visible_tokens(spec, encoder_ratio, encoder_mask)
    kept = decoder_kept_tokens(spec, decoder_mode, encoder_ratio, decoder_ratio, encoder_mask)
    encoder = encoder_flops(spec, vis, embedded=vis if embed_visible_only else t * h * w,
                            attention_included=attention_included)
    # the decoder reuses the encoder's mlp ratio
    dec_hidden = aligned(int(spec.decoder_dim * spec.mlp_ratio), decoder_mlp_align)
    decoder = 2 * vis * spec.dim * spec.decoder_dim + spec.decoder_depth * block_flops(
        vis + kept, spec.decoder_dim, dec_hidden, attention_included)
    head = 2 * kept * spec.decoder_dim * 3 * spec.tubelet_size * spec.patch_size**2
    return FlopsBreakdown(encoder, decoder, head)


def train_step_flops(spec: Sizes, *, batch_size: int = 1, decoder_mode: str = "running_cell",
                     encoder_ratio: float = 0.9, decoder_ratio: float = 0.5, attention_included: bool = True,
                     encoder_mask: str = "tube", embed_visible_only: bool = True,
                     decoder_mlp_align: int = 1) -> FlopsBreakdown:
    """FLOPs of one optimiser step for `batch_size` clips: 3x forward (backward = 2x forward).

    Activation-checkpointing recompute is deliberately NOT counted, so MFU stays comparable across
    checkpointing modes (model FLOPs, not hardware FLOPs).
    """
    fwd = pretrain_flops(spec, decoder_mode=decoder_mode, encoder_ratio=encoder_ratio,
                         decoder_ratio=decoder_ratio, attention_included=attention_included,
                         encoder_mask=encoder_mask, embed_visible_only=embed_visible_only,
                         decoder_mlp_align=decoder_mlp_align)
    return fwd.scaled(3 * batch_size)


def classifier_flops(spec: Sizes, num_classes: int, *, attention_included: bool = True) -> FlopsBreakdown:
    """Forward FLOPs of one clip through the fine-tuning classifier (all tokens, no decoder)."""
    t, h, w = grid_of(spec)
    n = t * h * w
    return FlopsBreakdown(encoder_flops(spec, n, embedded=n, attention_included=attention_included), 0,
                          2 * spec.dim * num_classes)
