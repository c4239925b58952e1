"""The authors' pretraining step, for the speedup ratio of `make gpu-check`: plain PyTorch (their pretraining
uses no DeepSpeed), fp16 autocast with a GradScaler, eager `math` attention, every block checkpointed, the
patch-embedding conv over every token and the decoder MLP at its unaligned width (2234 at ViT-g), AdamW
(0.9, 0.95) unfused, masks made on the CPU and copied every step, `loss.item()` every step.

    python -m benchmarks.authors_step --model g --batch 32 --steps 10 --out authors.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from vmae_ds.losses import pixel_target, reconstruction_loss
from vmae_ds.masking import TokenGrid, make_masks
from vmae_ds.models import create_pretrain_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.authors_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="g", help="size alias or registry name (default g)")
    p.add_argument("--batch", type=int, default=32, help="clips per step before num_sample (default 32)")
    p.add_argument("--num-sample", type=int, default=4, help="repeated augmentation (default 4)")
    p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a code check with a tiny model)")
    p.add_argument("--depth", type=int, help="encoder depth override (tests)")
    p.add_argument("--out", help="JSON results file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    over = {"depth": a.depth} if a.depth else {}
    with device:  # initialised where it trains: ViT-g's 1 B weights take seconds to initialise on host cores
        model = create_pretrain_model(a.model, attention="math", embed_visible_only=False, decoder_mlp_align=1,
                                      **over)
    model = model.to(device)
    model.set_activation_checkpointing("full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    amp = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    n = a.batch * a.num_sample
    t, h, w = model.grid
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(n, 3, t * model.tubelet_size, h * model.patch_size, w * model.patch_size,
                        generator=gen).to(device)
    times: list[float] = []
    res: dict = {}
    for i in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, n, TokenGrid(t, h, w), generator=gen)
        enc, dec = enc.to(device), dec.to(device)
        with torch.autocast(device.type, dtype=amp):
            pred = model(video, enc, dec)
        loss = reconstruction_loss(pred, pixel_target(video, model.patch_size, model.tubelet_size), enc, dec)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.02)
        scaler.step(opt)
        scaler.update()
        loss.item()  # their loop reads the loss every step
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            res = _report(a, n, times, device)
            if a.out:  # after every step: a run cut short by its time budget still leaves its numbers
                with open(a.out, "w") as f:
                    json.dump(res, f)
    print(json.dumps(res))
    return 0


def _report(a: argparse.Namespace, n: int, times: list[float], device: torch.device) -> dict:
    med = statistics.median(times)
    return {"model": a.model, "samples_per_step": n, "steps": len(times), "step_time_s": med, "clips_per_s": n / med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "config": "fp16 autocast + GradScaler, math attention, every block checkpointed, conv patch embedding "
                      "of every token, unaligned decoder MLP, plain PyTorch"}


if __name__ == "__main__":
    sys.exit(main())
