"""`vmae-flops` / `make flops`: the analytic FLOPs tables of vmae_ds.flops (all sizes, encoder-only vs dual
masking, the paper's numbers next to ours; `--umt`: one step of UMT vs VideoMAE V2 pretraining).

    python -m vmae_ds.flops_cli                # table for S, B, L, H, g: encoder-only vs dual masking
    python -m vmae_ds.flops_cli --models B g --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from .flops import PAPER_B_MACS, PAPER_G_MACS, RUNNING_CELL_RATIOS, grid_of, pretrain_flops, train_step_flops
from .models.registry import ALIASES, ModelSpec, get_spec


def _rows(models: Sequence[str], overrides: dict, encoder_ratio: float, decoder_ratio: float,
          embed_visible_only: bool = True) -> list[dict]:
    rows = []
    for name in models:
        spec = get_spec(name, **overrides)
        v1 = pretrain_flops(spec, decoder_mode="none", encoder_ratio=encoder_ratio,
                            embed_visible_only=embed_visible_only)
        v2 = pretrain_flops(spec, decoder_mode="running_cell", encoder_ratio=encoder_ratio,
                            decoder_ratio=decoder_ratio, embed_visible_only=embed_visible_only)
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
    """Counted the authors' way (the conv embeds every token), as the paper counts."""
    v1 = pretrain_flops(spec, decoder_mode="none", embed_visible_only=False).macs
    v2 = pretrain_flops(spec, decoder_mode="running_cell", decoder_ratio=decoder_ratio,
                        embed_visible_only=False).macs
    return (f"{label}: ours {v1 / 1e9:.2f} -> {v2 / 1e9:.2f} GMACs ({v1 / v2:.3f}x); paper {paper[0] / 1e9:.2f} -> "
            f"{paper[1] / 1e9:.2f} G ({paper[0] / paper[1]:.3f}x); difference {(v1 - paper[0]) / 1e9:+.2f} / "
            f"{(v2 - paper[1]) / 1e9:+.2f} G")


def umt_table() -> str:
    """One training step per clip, GFLOPs: UMT (8 frames, tubelet 1, 80 % masked, 6 aligned layers) vs
    VideoMAE V2 dual masking (16 frames, 90 % / running cell 50 %)."""
    # here, not at the top: the UMT objective brings the run config (pydantic) the other tables do not need
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
                    "the unit the paper calls GFLOPs. Tube encoder mask; the patch embedding of the visible "
                    "tokens only, as the model runs (--embed-all: of every token, the authors' conv).",
        epilog="Counted: patch embedding, every linear layer, and attention's two matmuls (q k^T, attn v); "
               "not counted: norms, softmax, GELU, biases, adds. One training step = 3x forward per clip "
               "(vmae_ds.flops.train_step_flops; checkpoint recompute not counted). The paper lines count the "
               "authors' way.")
    p.add_argument("--models", nargs="+", default=["S", "B", "L", "H", "g"], metavar="NAME",
                   help=f"model names or aliases ({', '.join(ALIASES)}); default: S B L H g")
    p.add_argument("--frames", type=int, default=None,
                   help="override input frames (default: the model's, 16; debug: 4)")
    p.add_argument("--img-size", type=int, default=None,
                   help="override input side in pixels (default: the model's, 224; debug: 32)")
    p.add_argument("--encoder-ratio", type=float, default=0.9, help="tube mask ratio (default: 0.9)")
    p.add_argument("--decoder-ratio", type=float, default=0.5, choices=RUNNING_CELL_RATIOS,
                   help="running-cell decoder mask ratio (default: 0.5)")
    p.add_argument("--embed-all", action="store_true",
                   help="count the patch embedding of every token (the authors' conv, embed_visible_only=False)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.add_argument("--umt", action="store_true", help="per-clip training cost of UMT-B / UMT-L (student fwd+bwd, "
                   "CLIP teacher fwd) next to VideoMAE V2 pretraining of B and g")
    args = p.parse_args(argv)
    if args.umt:
        print(umt_table())
        return 0

    overrides = {k: v for k, v in (("num_frames", args.frames), ("img_size", args.img_size)) if v is not None}
    try:
        rows = _rows(args.models, overrides, args.encoder_ratio, args.decoder_ratio, not args.embed_all)
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
