"""Loader benchmark: our loader vs a reference written the way the authors' loader works, same shards.

Reference (VideoMAE V2's VideoMAE dataset): decord decodes the needed frames at full size, each frame
becomes a PIL image, every one of the num_sample repeats crops and resizes every frame (PIL), then
converts to float and normalises on the CPU; float batches cross to the main process.
Ours (backend pyav by default, --backend to choose): only the needed frames are decoded (non-reference frames
nobody sampled are skipped), crops run on uint8 tensors for the whole clip at once, the batch
stays uint8 (normalised later on the GPU), masks are made in the main process.

clips/s counts output samples (each decoded clip gives num_sample of them, in both pipelines).
CPU seconds are summed over the main process and the loader workers (psutil), so "per core" is
clips per CPU-second: fair on a shared or small machine.

    python -m benchmarks.loader_bench                      # makes synthetic 320p shards first
    python -m benchmarks.loader_bench --shards DIR --workers 8 --batches 50
    python -m benchmarks.loader_bench --videos DIR --builds 16:0 16:3 --backend decord pyav --breakdown
                                       # real videos built to 320p both ways, per-stage CPU breakdown first
    python -m benchmarks.loader_bench --synth-size 720x1280 --reencode   # 720p sources: original bytes vs
                                                                          # shards built with --reencode
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vmae_ds.data import DataConfig, build_pretrain_loader, default_mask_fn, token_grid
from vmae_ds.data.shards import ShardSpecError, resolve_shards
from vmae_ds.data.stream import ShardReader, initial_position, parse_sample
from vmae_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, multiscale_crop_box, train_indices
from vmae_ds.engine.data_source import endless


class ReferenceStream(IterableDataset):
    """The authors' way, on our shards: full-size frames -> PIL -> per-frame crop/resize -> float normalise."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int):
        self.urls, self.cfg, self.seed = urls, cfg, seed

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        from decord import VideoReader  # as in their code: created in the worker, one thread

        info = get_worker_info()
        w = info.id if info else 0
        torch.set_num_threads(1)
        reader = ShardReader(self.urls, self.cfg, 0, 1, info.num_workers if info else 1, self.seed, w, None)
        pos = initial_position(w)
        gen = torch.Generator().manual_seed(self.seed + w)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        size = self.cfg.input_size
        while True:
            data, meta = parse_sample(reader.next_sample(pos))
            vr = VideoReader(io.BytesIO(data), num_threads=1)
            idx = train_indices(0, len(vr), self.cfg.num_frames, self.cfg.stride_for(meta.get("source", "")), gen)
            buffer = vr.get_batch(idx).asnumpy()
            images = [Image.fromarray(buffer[i]).convert("RGB") for i in range(len(idx))]
            out = []
            for _ in range(self.cfg.num_sample):
                top, left, ch, cw = multiscale_crop_box(images[0].height, images[0].width, size,
                                                        self.cfg.scales, gen)
                frames = [im.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
                          for im in images]
                tensors = [(torch.from_numpy(np.asarray(f, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean)
                           / std for f in frames]
                out.append(torch.stack(tensors, dim=1))  # (3, T, S, S) float32
            yield out


def _on_gpu(batches: Iterator[dict]) -> Iterator[dict]:
    """backend nvdec: each batch decoded on the GPU (what the training step's `.to(device)` does), finished
    before the next is asked for, so the wall time includes the GPU's decode."""
    for b in batches:
        b["video"] = b["video"].to("cuda")
        torch.cuda.synchronize()
        yield b


def _collate(items: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([x for item in items for x in item])


def _cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of this process, of its children): user + system."""
    main = sum(proc.cpu_times()[:2])
    children = 0.0
    for p in proc.children(recursive=True):
        try:
            t = p.cpu_times()
            children += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return main, children


def measure(batches: Iterator, n: int, warmup: int, batch_size: int) -> dict:
    proc = psutil.Process()
    for _ in range(warmup):  # worker start-up and first shard opens are not what we measure
        next(batches)
    (main0, kids0), t0 = _cpu_seconds(proc), time.perf_counter()
    for _ in range(n):
        next(batches)
    wall = time.perf_counter() - t0
    main1, kids1 = _cpu_seconds(proc)
    main, cpu = main1 - main0, main1 - main0 + kids1 - kids0
    clips = n * batch_size
    return {"clips": clips, "wall_s": wall, "cpu_s": cpu, "main_cpu_s": main, "clips_per_s": clips / wall,
            "cores_used": cpu / wall, "clips_per_core_s": clips / cpu}


def synth_shards(folder: Path, clips: int, size: tuple[int, int], frames: int, reencode: bool = False,
                 workers: int = 1) -> Path:
    """Synthetic H.264 clips of `size` in `folder/videos` (made once), built into `folder/shards` (original
    bytes) or `folder/shards_reencoded` (`vmae-shards build --reencode`: short side 320, keyframe every 16)."""
    from data_tools.manifest import scan_folder, write_manifest
    from data_tools.synth import make_videos

    if not (folder / "m.jsonl").exists():
        make_videos(folder / "videos", clips, frames=frames, size=size, fps=25)
        write_manifest(scan_folder(folder / "videos", source="k710"), folder / "m.jsonl")
    return _build(folder / "m.jsonl", folder / ("shards_reencoded" if reencode else "shards"), reencode, workers)


def _build(manifest: Path, out: Path, reencode: bool, workers: int, keyint: int = 16, bframes: int = 3) -> Path:
    from data_tools.build import build_shards
    from data_tools.clipcheck import ClipSettings

    build_shards(manifest, out, shard_size=8, workers=workers, progress=False,
                 clip=ClipSettings(reencode=reencode, keyint=keyint, bframes=bframes))
    return out


def video_shards(videos: Path, folder: Path, repeat: int, workers: int, keyint: int = 16,
                 bframes: int = 3) -> tuple[Path, int]:
    """Real videos (every file of `videos`, each listed `repeat` times) built with `--reencode` into 320p shards
    (keyframe every `keyint`, `bframes` non-reference B-frames): the copies both pipelines read, as the authors
    read 320p copies."""
    from data_tools.manifest import ClipRow, scan_folder, write_manifest

    found = scan_folder(videos, source="k710")
    if not found:
        raise SystemExit(f"python -m benchmarks.loader_bench: error: --videos {videos}: no video files there")
    manifest = folder / "videos.jsonl"
    write_manifest([ClipRow(path=r.path, source=r.source) for _ in range(repeat) for r in found], manifest)
    return _build(manifest, folder / f"videos_k{keyint}_b{bframes}", True, workers, keyint, bframes), len(found)


# Samples/s one GPU consumes (the arithmetic, H100/H200 bf16 dense peak 989 TFLOP/s): ViT-B dual masking
# 155 GFLOP a sample forward + backward at 40 % MFU; ViT-g at 45 % MFU.
GPU_DEMAND = {"ViT-B": 2500, "ViT-g": 310}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", help="shard folder / index.json / pattern, one or more sets (default: make "
                   "synthetic 320p shards)")
    p.add_argument("--videos", help="a folder of real videos: built with --reencode into 320p shards (each "
                   "video --repeat times) that both pipelines read")
    p.add_argument("--repeat", type=int, default=8, help="--videos: copies of each video in the shards (default 8)")
    p.add_argument("--builds", nargs="+", default=["16:3"], metavar="KEYINT:BFRAMES",
                   help="--videos: one 320p shard set per entry, built with --reencode --keyint KEYINT --bframes "
                   "BFRAMES (default 16:3, the --reencode defaults; 16:0 is the layout before non-reference "
                   "B-frames)")
    p.add_argument("--synth-clips", type=int, default=24,
                   help="synthetic clips when --shards is not given (default 24)")
    p.add_argument("--synth-size", default="320x426", help="synthetic clip HxW (default 320x426, short side 320)")
    p.add_argument("--synth-frames", type=int, default=96, help="synthetic clip length in frames (default 96)")
    p.add_argument("--workers", type=int, default=2, help="loader workers for both pipelines (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch after repetition (default 8)")
    p.add_argument("--num-sample", type=int, default=4, help="repeated augmentation (default 4)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--input-size", type=int, default=224, help="crop side in pixels (default 224)")
    p.add_argument("--backend", nargs="+", default=["pyav"], choices=("decord", "pyav", "nvdec"),
                   help="our decoder; several: our pipeline once with each (default pyav; nvdec: the batches are "
                   "decoded on the GPU in this process, CUDA only)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per pipeline (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is shown (default 3)")
    p.add_argument("--pipelines", nargs="*", default=["ours", "reference"], choices=("ours", "reference"),
                   help="which pipelines to time (default both; none: only --breakdown)")
    p.add_argument("--breakdown", type=int, nargs="?", const=48, default=0, metavar="CLIPS",
                   help="first time every stage of a worker's work per decoded clip over CLIPS clips (default 48; "
                   "see benchmarks/loader_breakdown.py) on each shard set, with each CPU --backend")
    p.add_argument("--reencode", action="store_true", help="synthetic clips: also build them with --reencode and "
                   "measure both pipelines on both shard sets (original bytes vs re-encoded 320p, keyframe 16)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.shards and a.videos:
        p.error("--shards and --videos: give one")

    with tempfile.TemporaryDirectory() as tmp:
        sets: list[tuple[str, str]] = []
        workers = max(1, a.workers)
        if a.videos:
            for spec in a.builds:
                k, bf = (int(x) for x in spec.split(":"))
                shards, n = video_shards(Path(a.videos), Path(tmp), a.repeat, workers, k, bf)
                sets.append((f"320p keyint {k} bframes {bf}", str(shards)))
            label = f"{n} real videos of {a.videos} x {a.repeat}, vmae-shards build --reencode"
        elif a.shards is None:
            h, w = (int(x) for x in a.synth_size.split("x"))
            print(f"making {a.synth_clips} synthetic {h}x{w} clips of {a.synth_frames} frames ...", flush=True)
            sets.append((f"original {h}x{w}", str(synth_shards(Path(tmp), a.synth_clips, (h, w), a.synth_frames,
                                                              workers=workers))))
            if a.reencode:
                sets.append(("--reencode 320p", str(synth_shards(Path(tmp), a.synth_clips, (h, w), a.synth_frames,
                                                                 reencode=True, workers=workers))))
            label = f"synthetic: {a.synth_clips} H.264 clips {h}x{w}, {a.synth_frames} frames"
        else:
            if a.reencode:
                print(f"{p.prog}: error: --reencode builds from synthetic clips; build your own with "
                      f"`vmae-shards build --reencode` and pass each with --shards", file=sys.stderr)
                return 2
            sets += [(x, x) for x in a.shards]
            label = ", ".join(a.shards)
        results: dict[str, dict] = {}
        for name, shards in sets:
            try:
                urls, counts = resolve_shards(shards)
            except ShardSpecError as e:  # a typo'd --shards: one line, not a traceback
                print(f"{p.prog}: error: --{e}", file=sys.stderr)
                return 2
            cfg = DataConfig(shards=shards, num_frames=a.num_frames, input_size=a.input_size,
                             num_sample=a.num_sample, num_workers=a.workers, pin_memory=False,
                             backend=next((b for b in a.backend if b != "nvdec"), "pyav"))
            for backend in [b for b in a.backend if b != "nvdec"] if a.breakdown else []:
                from benchmarks.loader_breakdown import breakdown, report

                res = breakdown(urls, cfg.model_copy(update={"backend": backend}), a.breakdown,
                                a.batch_size // a.num_sample)
                if counts:
                    res["bytes_per_clip"] = _shard_bytes(urls) / sum(counts)
                size = f", {res['bytes_per_clip'] / 1e3:.0f} kB per clip" if counts else ""
                print(f"\n{name}{size}, backend {backend}: " + report(res), flush=True)
                results[f"breakdown, {backend}, {name}"] = res
            for pipeline, stats in _rounds(cfg, urls, a).items():
                results[f"{pipeline}, {name}" if len(sets) > 1 else pipeline] = stats

    timed = {k: r for k, r in results.items() if not k.startswith("breakdown")}
    if timed:
        print(_table(timed, label, a))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def _shard_bytes(urls: list[str]) -> int:
    return sum(Path(u).stat().st_size for u in urls if Path(u).exists())


def _table(results: dict[str, dict], label: str, a: argparse.Namespace) -> str:
    base = next((r for k, r in results.items() if k.startswith("reference")), None)
    lines = [f"\nshards ({label}): {a.num_frames} frames x {a.input_size}px, num_sample {a.num_sample}, batch "
             f"{a.batch_size}, {a.workers} workers, {a.batches} timed batches x {a.rounds} rounds (median), host CPUs "
             f"{psutil.cpu_count()}; clips = samples after repetition; ratio: clips per CPU-second over the first "
             f"reference row; cores per GPU: CPU cores one GPU needs at this rate "
             f"({', '.join(f'{m} {n} samples/s' for m, n in GPU_DEMAND.items())})"]
    width = max(28, *(len(k) for k in results))
    head = " | ".join(f"cores per GPU {m}" for m in GPU_DEMAND)
    lines.append(f"| {'pipeline':<{width}} | clips/s | CPU cores used | main process | clips/s per core | "
                 f"ratio per core | {head} |")
    lines.append(f"|{'-' * (width + 2)}|---------|----------------|--------------|------------------|"
                 f"----------------|" + "|".join("-" * (len(f"cores per GPU {m}") + 2) for m in GPU_DEMAND) + "|")
    for name, r in results.items():
        ratio = f"{r['clips_per_core_s'] / base['clips_per_core_s']:13.2f}x" if base else f"{'n/a':>14}"
        cores = " | ".join(f"{n / r['clips_per_core_s']:{len(f'cores per GPU {m}')}.1f}"
                           for m, n in GPU_DEMAND.items())
        lines.append(f"| {name:<{width}} | {r['clips_per_s']:7.1f} | {r['cores_used']:14.2f} | "
                     f"{r['main_cpu_s'] / r['cpu_s'] * 100:11.0f}% | {r['clips_per_core_s']:16.1f} | {ratio} | "
                     f"{cores} |")
    return "\n".join(lines)


def _rounds(cfg: DataConfig, urls: list[str], a: argparse.Namespace) -> dict[str, dict]:
    """Both pipelines on one shard set, alternated for `a.rounds` rounds: each one's median round (load from
    other jobs on a shared machine then hits both alike)."""

    def run_ours(backend: str) -> dict:
        mine = cfg.model_copy(update={"backend": backend})
        loader = build_pretrain_loader(mine, batch_size=a.batch_size, rank=0, world_size=1, seed=0,
                                       mask_fn=default_mask_fn(token_grid(mine)))
        batches = endless(loader)  # exact epochs end; the measured stream runs on
        if backend == "nvdec":
            batches = _on_gpu(batches)
        try:
            return measure(batches, a.batches, a.warmup, a.batch_size)
        finally:
            loader.close()

    def run_reference() -> dict:
        ref = DataLoader(ReferenceStream(urls, cfg, seed=0), batch_size=a.batch_size // a.num_sample,
                         num_workers=a.workers, collate_fn=_collate, persistent_workers=a.workers > 0,
                         prefetch_factor=2 if a.workers else None)
        it = iter(ref)
        try:
            return measure(it, a.batches, a.warmup, a.batch_size)
        finally:
            it._shutdown_workers()  # no idle workers left to blur the next round's CPU count

    runs = {"reference (authors' way)": run_reference} if "reference" in a.pipelines else {}
    if "ours" in a.pipelines:
        for b in a.backend:
            runs[f"ours, {b}"] = functools.partial(run_ours, b)
    rounds: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, run in runs.items():
            rounds[k].append(run())
    return {name: sorted(rs, key=lambda r: r["clips_per_core_s"])[len(rs) // 2] for name, rs in rounds.items()}


if __name__ == "__main__":
    raise SystemExit(main())
