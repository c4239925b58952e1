"""`vmae-extract`: encoder features per video for downstream work (temporal action detection, retrieval).

Each video is read in sliding windows (num_frames frames, `--sampling-rate` apart, a window every `--stride`
frames); each window is resized (short side) and centre-cropped to the model's input and encoded. Features:
`mean` = the classifier's pre-logit vector fc_norm(mean over tokens), as the VideoMAE V2 authors extract for
TAD; `tokens` = every token of the last block. One `<id>.npy` per video, (windows, D) or (windows, N, D),
plus `<id>.json` (window starts, fps, ...) and, at the end, `index.jsonl` over all videos. Videos are dealt
to ranks (video i to rank i % world); a rerun skips the videos already written (resumable); a video that
cannot be decoded is skipped, counted and listed in errors.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .engine.entry import leave
from .engine.launch import inference_setup

EPILOG = """\
examples:
  vmae-extract weights/vitg_k710.safetensors --model g --videos /data/thumos/videos --out feats/thumos \\
      --frames 16 --sampling-rate 1 --stride 4
  vmae-extract runs/vitb_k400 --videos clips.jsonl --out feats/k400 --pool tokens
  vmae-extract runs/vitb_k400 --videos https://data.example.org/k400_val/index.json --out feats/k400_val
  deepspeed --num_gpus 8 --module vmae_ds.extract weights/vitg.safetensors --model g --videos v/ --out f/
"""


class ExtractError(ValueError):
    """Weights or inputs that cannot be used; one line naming them."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmae-extract", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a fine-tuning or pretraining run folder, an exported / official checkpoint, "
                                   "or an HF VideoMAE folder")
    p.add_argument("--videos", required=True, help="a folder of videos, a manifest (csv/tsv/jsonl/list), or a shard "
                   "set: its index.json (a path, or an http(s)://, s3://, gs:// URL) or a folder holding one; ids are "
                   "then the sample keys, and shard s goes to rank s %% world")
    p.add_argument("--out", required=True, help="feature folder")
    p.add_argument("--model", help="model name or alias (default: the run's)")
    p.add_argument("--frames", type=int, help="frames per window (default: the model's)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--sampling-rate", type=int, default=4, help="frame stride inside a window (default 4)")
    p.add_argument("--stride", type=int, default=16, help="frames between window starts (default 16)")
    p.add_argument("--pool", choices=("mean", "tokens"), default="mean", help="mean: one vector per window "
                   "(default); tokens: every token")
    p.add_argument("--batch", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--fp16", action="store_true", help="store float16 features (half the disk)")
    p.add_argument("--backend", default="decord", help="video decoder (as data.shards.backend)")
    p.add_argument("--attention", default="auto", choices=("auto", "flash_attn", "sdpa", "math"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_encoder(args: argparse.Namespace):
    """A VideoClassifier carrying the encoder (and fc_norm when the weights have one)."""
    from .models import create_classifier, load_pretrained

    path = Path(args.weights)
    if not path.exists():
        raise ExtractError(f"{path}: no such run folder or weights file")
    sizes = {k: v for k, v in (("num_frames", args.frames), ("img_size", args.img_size),
                               ("tubelet_size", getattr(args, "tubelet", None))) if v is not None}
    from .export import run_config_of

    cfg = run_config_of(path) if path.is_dir() else None
    if cfg is not None:
        from .export import consolidate, find_checkpoint

        name = args.model or cfg.model.name
        over = {k: v for k, v in cfg.model.overrides().items() if k in ("patch_size", "tubelet_size", "depth",
                                                                         "num_frames", "img_size")}
        state = consolidate(find_checkpoint(path))
        import tempfile

        from safetensors.torch import save_file
        with tempfile.TemporaryDirectory() as tmp:  # one loading path for every source
            save_file(state, f"{tmp}/w.safetensors")
            model = create_classifier(name, 1, attention=args.attention, **{**over, **sizes})
            report = load_pretrained(model, f"{tmp}/w.safetensors", strict=False)
    else:
        if not args.model:
            raise ExtractError(f"{path}: a weights file: give --model (S, B, L, H, g, or a registry name)")
        model = create_classifier(args.model, 1, attention=args.attention, **sizes)
        report = load_pretrained(model, path, strict=False)
    lost = [s for s in report.skipped if not s.startswith("head.")]
    missing = [m for m in report.missing if not m.startswith(("head.", "fc_norm."))]
    if lost or missing:
        raise ExtractError(f"{path}: encoder weights do not fit: {(lost + missing)[:6]}")
    return model.eval().requires_grad_(False)


def video_list(source: str) -> list[tuple[str, str]]:
    """(id, path) per video, in manifest / sorted-folder order; ids are unique and safe as file names."""
    from data_tools.manifest import read_manifest, scan_folder

    p = Path(source)
    rows = scan_folder(p) if p.is_dir() else read_manifest(p)
    if not rows:
        raise ExtractError(f"{source}: no videos")
    base = p if p.is_dir() else p.resolve().parent
    out, used = [], set()
    for row in rows:
        path = row.path if Path(row.path).is_absolute() else str(base / row.path)
        vid = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(row.path).stem).strip("_") or "video"
        if vid in used:
            vid = f"{vid}_{len(out):06d}"
        used.add(vid)
        out.append((vid, path))
    return out


def windows(num_frames: int, clip_frames: int, rate: int, stride: int) -> list[list[int]]:
    """Frame indices of every window: starts 0, stride, ... while the window fits (at least one window;
    indices past the end repeat the last frame)."""
    span = (clip_frames - 1) * rate + 1
    starts = list(range(0, max(num_frames - span, 0) + 1, stride))
    return [[min(s + i * rate, num_frames - 1) for i in range(clip_frames)] for s in starts]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from .data.decode import DecodeError
    from .data.shards import ShardSpecError
    from .models.checkpoint_import import CheckpointError

    try:
        return _extract(args, DecodeError)
    except (ExtractError, CheckpointError, FileNotFoundError, ShardSpecError) as e:
        print(f"vmae-extract: error: {e}", file=sys.stderr, flush=True)
        return 2


def _extract(args: argparse.Namespace, decode_error: type) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .data.decode import open_video
    from .data.shard_videos import ShardVideos, is_shard_set
    from .data.transforms import normalize_on_device, pixel_stats, spatial_views, to_tchw

    if args.stride < 1 or args.sampling_rate < 1 or args.batch < 1:
        raise ExtractError("--stride, --sampling-rate and --batch must be >= 1")
    model = load_encoder(args)
    shards = None
    videos = [] if is_shard_set(args.videos) else video_list(args.videos)
    rank, world, device, dtype = inference_setup(args.dtype)
    model = model.to(device=device, dtype=dtype)
    stats = pixel_stats(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = [0]
    if videos:
        mine = [(v, p) for i, (v, p) in enumerate(videos) if i % world == rank]
        todo = [(v, p, Path(p).read_bytes) for v, p in mine if not (out / f"{v}.npy").exists()]
        kept[0], errors, total = len(mine) - len(todo), [], len(todo)
    else:  # a shard set: each video is read from its shard (ids: the sample keys)
        shards = ShardVideos(args.videos, rank, world)
        errors, total = shards.errors, shards.mine

        def unwritten():
            for v, p, data in shards:
                if (out / f"{v}.npy").exists():
                    kept[0] += 1
                else:
                    yield v, p, (lambda d=data: d)
        todo = unwritten()
    wrote = 0
    size, frames_per_clip = model.img_size, model.num_frames
    bar = tqdm(todo, total=total, desc=f"extract (rank {rank})", unit="video", disable=rank != 0)
    for vid, path, load in bar:
        try:
            reader = open_video(load(), args.backend)
            wins = windows(reader.num_frames, frames_per_clip, args.sampling_rate, args.stride)
            feats = []
            for b in range(0, len(wins), args.batch):
                clips = []
                for idx in wins[b:b + args.batch]:
                    uniq = sorted(set(idx))
                    frames = to_tchw(reader.get(uniq))[[uniq.index(j) for j in idx]]
                    clips.append(spatial_views(frames, size, 1)[0])
                x = normalize_on_device(torch.stack(clips).to(device), dtype, stats)
                with torch.no_grad():
                    tokens = model.forward_features(x)[0]
                    f = model.fc_norm(tokens.mean(dim=1)) if args.pool == "mean" else tokens
                feats.append(f.float().cpu())
        except (decode_error, OSError) as e:
            errors.append({"id": vid, "path": path, "reason": str(e)[:300]})
            continue
        arr = torch.cat(feats).numpy().astype(np.float16 if args.fp16 else np.float32)
        tmp = out / f".{vid}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        meta = {"id": vid, "path": path, "file": f"{vid}.npy", "shape": list(arr.shape), "fps": reader.fps,
                "num_frames": reader.num_frames, "window_starts": [w[0] for w in wins],
                "frames_per_window": frames_per_clip, "sampling_rate": args.sampling_rate, "stride": args.stride,
                "pool": args.pool, "weights": str(args.weights)}
        (out / f"{vid}.json").write_text(json.dumps(meta))
        os.replace(tmp, out / f"{vid}.npy")  # the .npy appears last: its presence means done
        wrote += 1
    bar.close()
    # this run's failures only: a video that fails is retried by the next run, and listed again if it still fails
    (out / f"errors.rank{rank}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in errors))
    if world > 1:
        dist.barrier()
    if rank == 0:
        done = [v for v, _ in videos if (out / f"{v}.npy").exists()] if videos else \
            sorted(p.stem for p in out.glob("*.npy"))
        with open(out / "index.jsonl", "w") as f:
            for v in done:
                f.write((out / f"{v}.json").read_text() + "\n")
        skipped = [json.loads(line) for p in sorted(out.glob("errors.rank*.jsonl"))
                   for line in p.read_text().splitlines() if line.strip()]
        print(f"features: {len(done)} of {len(videos) if videos else shards.total} videos in {out} (index.jsonl); "
              f"rank 0 wrote {wrote} now and kept {kept[0]} from before"
              + (f"; {len(skipped)} undecodable, listed in {out}/errors.rank*.jsonl" if skipped else ""), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


def cli() -> None:
    leave(main())


if __name__ == "__main__":
    cli()
