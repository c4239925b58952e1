"""Analytic FLOPs per clip for VideoMAE V2 pretraining and fine-tuning models.

Convention: a multiply-add is 2 FLOPs, as `torch.utils.flop_counter.FlopCounterMode` counts; only matmuls,
linear layers, attention's two batched matmuls and the patch-embedding conv are counted (norms, softmax,
GELU, biases and residual adds are not). The VideoMAE V2 paper's "GFLOPs" are multiply-adds: use `.macs`.

    python -m vmae_ds.flops                # table for S, B, L, H, g: encoder-only vs dual masking
    python -m vmae_ds.flops --models B g --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .masking import RUNNING_CELL_RATIOS
from .models.registry import ALIASES, ModelSpec, get_spec

DECODER_MODES = ("running_cell", "none", "random", "frame")
# VideoMAE V2 (arXiv 2303.16727), ViT-g per clip, encoder-only -> dual masking, in multiply-adds.
PAPER_G_MACS = (263.93e9, 241.61e9)
# VideoMAE V2 decoder-masking ablation, ViT-B: no decoder masking vs running cell 50% (multiply-adds).
PAPER_B_MACS = (35.48e9, 25.87e9)


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


def grid_of(spec: ModelSpec) -> tuple[int, int, int]:
    """Token grid (T, H, W) after tubelet embedding."""
    side = spec.img_size // spec.patch_size
    return spec.num_frames // spec.tubelet_size, side, side


def block_flops(tokens: int, dim: int, mlp_hidden: int, attention_included: bool = True) -> int:
    """One pre-norm transformer block on `tokens` tokens: qkv, (q k^T, attn v), proj, fc1, fc2."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_hidden)
    # Two (n x n x head_dim) batched matmuls per head; summed over heads that is n*n*dim each.
    attention = 2 * 2 * tokens * tokens * dim if attention_included else 0
    return linear + attention


def encoder_visible_tokens(spec: ModelSpec, encoder_ratio: float, encoder_mask: str = "tube") -> int:
    """Visible tokens: tube: per frame H*W - int(ratio * H*W), times T; random: N - int(ratio * N)."""
    if not 0.0 <= encoder_ratio < 1.0:  # like vmae_ds.masking: a ratio of 1 would leave no visible token
        raise ValueError(f"encoder mask ratio must be in [0, 1), got {encoder_ratio}")
    t, h, w = grid_of(spec)
    if encoder_mask == "tube":
        return t * (h * w - int(encoder_ratio * h * w))
    if encoder_mask == "random":
        return t * h * w - int(encoder_ratio * t * h * w)
    raise ValueError(f"encoder_mask must be tube or random, got {encoder_mask!r}")


def decoder_kept_tokens(spec: ModelSpec, decoder_mode: str, encoder_ratio: float, decoder_ratio: float,
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


def _encoder_flops(spec: ModelSpec, tokens: int, attention_included: bool) -> int:
    t, h, w = grid_of(spec)
    patch_dim = 3 * spec.tubelet_size * spec.patch_size**2
    # The conv embeds every token; masking happens after it.
    embed = 2 * t * h * w * spec.dim * patch_dim
    hidden = int(spec.dim * spec.mlp_ratio)
    return embed + spec.depth * block_flops(tokens, spec.dim, hidden, attention_included)


def pretrain_flops(spec: ModelSpec, *, decoder_mode: str = "running_cell", encoder_ratio: float = 0.9,
                   decoder_ratio: float = 0.5, attention_included: bool = True,
                   encoder_mask: str = "tube") -> FlopsBreakdown:
    """Forward FLOPs of one clip through the pretraining model.

    decoder_mode: running_cell | random | frame (dual masking) or none (encoder-only masking);
    encoder_mask: tube (VideoMAE) | random; attention_included=False drops the two attention matmuls.
    """
    vis = encoder_visible_tokens(spec, encoder_ratio, encoder_mask)
    kept = decoder_kept_tokens(spec, decoder_mode, encoder_ratio, decoder_ratio, encoder_mask)
    encoder = _encoder_flops(spec, vis, attention_included)
    dec_hidden = int(spec.decoder_dim * spec.mlp_ratio)  # the decoder reuses the encoder's mlp ratio
    decoder = 2 * vis * spec.dim * spec.decoder_dim + spec.decoder_depth * block_flops(
        vis + kept, spec.decoder_dim, dec_hidden, attention_included)
    head = 2 * kept * spec.decoder_dim * 3 * spec.tubelet_size * spec.patch_size**2
    return FlopsBreakdown(encoder, decoder, head)


def train_step_flops(spec: ModelSpec, *, batch_size: int = 1, decoder_mode: str = "running_cell",
                     encoder_ratio: float = 0.9, decoder_ratio: float = 0.5,
                     attention_included: bool = True, encoder_mask: str = "tube") -> FlopsBreakdown:
    """FLOPs of one optimiser step for `batch_size` clips: 3x forward (backward = 2x forward).

    Activation-checkpointing recompute is deliberately NOT counted, so MFU stays comparable across
    checkpointing modes (model FLOPs, not hardware FLOPs).
    """
    fwd = pretrain_flops(spec, decoder_mode=decoder_mode, encoder_ratio=encoder_ratio,
                         decoder_ratio=decoder_ratio, attention_included=attention_included,
                         encoder_mask=encoder_mask)
    return fwd.scaled(3 * batch_size)


def classifier_flops(spec: ModelSpec, num_classes: int, *, attention_included: bool = True) -> FlopsBreakdown:
    """Forward FLOPs of one clip through the fine-tuning classifier (all tokens, no decoder)."""
    t, h, w = grid_of(spec)
    encoder = _encoder_flops(spec, t * h * w, attention_included)
    return FlopsBreakdown(encoder, 0, 2 * spec.dim * num_classes)


# ----------------------------------------------------------------------------------------------- CLI

def _rows(models: Sequence[str], overrides: dict, encoder_ratio: float, decoder_ratio: float) -> list[dict]:
    rows = []
    for name in models:
        spec = get_spec(name, **overrides)
        v1 = pretrain_flops(spec, decoder_mode="none", encoder_ratio=encoder_ratio)
        v2 = pretrain_flops(spec, decoder_mode="running_cell", encoder_ratio=encoder_ratio,
                            decoder_ratio=decoder_ratio)
        t, h, w = grid_of(spec)
        for mode, fb in (("encoder-only", v1), (f"dual (running cell {decoder_ratio:g})", v2)):
            rows.append({"model": name, "tokens": t * h * w, "mode": mode, **asdict(fb),
                         "total": fb.total, "macs": fb.macs, "ratio_vs_dual": v1.total / v2.total})
    return rows


def _format_table(rows: list[dict]) -> str:
    g = 1e9
    head = (f"{'model':<6}{'tokens':>7}  {'mode':<26}{'enc GFLOPs':>11}{'dec GFLOPs':>11}{'head GFLOPs':>12}"
            f"{'total GFLOPs':>13}{'total GMACs':>12}{'enc-only/dual':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['ratio_vs_dual']:.3f}x" if r["mode"] == "encoder-only" else ""
        lines.append(f"{r['model']:<6}{r['tokens']:>7}  {r['mode']:<26}{r['encoder'] / g:>11.2f}"
                     f"{(r['decoder']) / g:>11.2f}{r['head'] / g:>12.2f}{r['total'] / g:>13.2f}"
                     f"{r['macs'] / g:>12.2f}{ratio:>14}")
    return "\n".join(lines)


def _paper_line(label: str, spec: ModelSpec, paper: tuple[float, float], decoder_ratio: float) -> str:
    v1 = pretrain_flops(spec, decoder_mode="none").macs
    v2 = pretrain_flops(spec, decoder_mode="running_cell", decoder_ratio=decoder_ratio).macs
    return (f"{label}: ours {v1 / 1e9:.2f} -> {v2 / 1e9:.2f} GMACs ({v1 / v2:.3f}x); paper {paper[0] / 1e9:.2f} -> "
            f"{paper[1] / 1e9:.2f} G ({paper[0] / paper[1]:.3f}x); difference {(v1 - paper[0]) / 1e9:+.2f} / "
            f"{(v2 - paper[1]) / 1e9:+.2f} G")


def umt_table() -> str:
    """One training step per clip, GFLOPs: UMT (8 frames, tubelet 1, 80 % masked, 6 aligned layers) vs
    VideoMAE V2 dual masking (16 frames, 90 % / running cell 50 %)."""
    from .models.clip_teacher import get_clip_spec
    from .objectives.umt import umt_flops

    rows = ["| run | student | teacher | student fwd+bwd | teacher fwd | total per clip |",
            "|---|---|---|---|---|---|"]
    for label, student, teacher in (("UMT-B", "B", "clip_b16"), ("UMT-L", "L", "clip_l14")):
        spec = get_spec(student, num_frames=8, tubelet_size=1)
        t = get_clip_spec(teacher)
        size = spec.img_size // spec.patch_size * t.patch_size
        f = umt_flops(spec, t, size, 6, 0.8)
        total = (f["model"] + f["teacher"]) / 1e9
        rows.append(f"| {label} | ViT-{student}/16, 8 x 224, tubelet 1 | {teacher} at {size} px x 8 frames | "
                    f"{f['model'] / 1e9:.0f} G | {f['teacher'] / 1e9:.0f} G | {total:.0f} G |")
    for label, size in (("VideoMAE V2 B", "B"), ("VideoMAE V2 g", "g")):
        f = train_step_flops(get_spec(size)).total
        rows.append(f"| {label} | ViT-{size}, 16 x 224, dual masking | none | {f / 1e9:.0f} G | 0 | {f / 1e9:.0f} G |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vmae-flops",
        description="Analytic forward FLOPs per clip of VideoMAE V2 pretraining, encoder-only masking "
                    "(VideoMAE v1: the decoder predicts all hidden tokens) vs dual masking (running cell). "
                    "FLOPs count a multiply-add as 2 (like torch's FlopCounterMode); GMACs = GFLOPs / 2 is "
                    "the unit the paper calls GFLOPs. Tube encoder mask.",
        epilog="Counted: patch-embed conv, every linear layer, and attention's two matmuls (q k^T, attn v); "
               "not counted: norms, softmax, GELU, biases, adds. One training step = 3x forward per clip "
               "(vmae_ds.flops.train_step_flops; checkpoint recompute not counted).")
    p.add_argument("--models", nargs="+", default=["S", "B", "L", "H", "g"], metavar="NAME",
                   help=f"model names or aliases ({', '.join(ALIASES)}); default: S B L H g")
    p.add_argument("--frames", type=int, default=None,
                   help="override input frames (default: the model's, 16; debug: 4)")
    p.add_argument("--img-size", type=int, default=None,
                   help="override input side in pixels (default: the model's, 224; debug: 32)")
    p.add_argument("--encoder-ratio", type=float, default=0.9, help="tube mask ratio (default: 0.9)")
    p.add_argument("--decoder-ratio", type=float, default=0.5, choices=RUNNING_CELL_RATIOS,
                   help="running-cell decoder mask ratio (default: 0.5)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.add_argument("--umt", action="store_true", help="per-clip training cost of UMT-B / UMT-L (student fwd+bwd, "
                   "CLIP teacher fwd) next to VideoMAE V2 pretraining of B and g")
    args = p.parse_args(argv)
    if args.umt:
        print(umt_table())
        return 0

    overrides = {k: v for k, v in (("num_frames", args.frames), ("img_size", args.img_size)) if v is not None}
    try:
        rows = _rows(args.models, overrides, args.encoder_ratio, args.decoder_ratio)
    except ValueError as e:
        p.error(str(e))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_format_table(rows))
    if not overrides and args.encoder_ratio == 0.9:
        print()
        print(_paper_line("ViT-g vs paper (MACs)", get_spec("g"), PAPER_G_MACS, args.decoder_ratio))
        if args.decoder_ratio == 0.5:
            print(_paper_line("ViT-B vs paper ablation (MACs)", get_spec("B"), PAPER_B_MACS, 0.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
