"""Where the loader's CPU time goes, per decoded clip: `python -m benchmarks.loader_bench --breakdown`.

Every stage of one worker's work is timed in this process (one thread, as a worker runs) with
`time.process_time`, over the same clips and the same draws as the loader makes:

  read        the shard's tar members up to this sample, and its json
  open        the container opened by the decoder (demuxer, stream probe, frame index)
  decode      the sampled frames decoded and converted to RGB by the configured backend
  crop        num_sample multi-scale crops resized to input_size (uint8)
  collate     the crops packed into the (B, 3, T, S, S) batch
  shm         the batch's pages moved to shared memory for the main process (what the DataLoader does)

`decode` is split further with PyAV's decoder, timed one packet at a time as its reader walks: the frames the
sampler asked for, the frames decoded only because decoding reaches them (from the keyframe before each
wanted frame), and the YUV -> RGB conversion of the wanted frames. The main process (batch receive, masks)
is the difference between the whole pipeline's CPU time and the workers', printed by loader_bench.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from vmae_ds.data.config import DataConfig
from vmae_ds.data.decode import PyAVReader, open_video
from vmae_ds.data.shards import PassLayout
from vmae_ds.data.stream import MultiScaleCrops, ShardReader, clip_frame_indices, initial_position, parse_sample
from vmae_ds.data.transforms import stack_channels_first, to_tchw

STAGES = ("read", "open", "decode", "crop", "collate", "shm")


def _pyav_split(data: bytes, wanted: list[int]) -> dict[str, float]:
    """CPU seconds of decoding the wanted frames, of the other packets sent on the way (the references between
    the keyframe and a wanted frame; non-reference frames no one wants are skipped, at almost no cost), and of
    converting the wanted frames to RGB; and how many frames were decoded. Walks the packets as
    `PyAVReader.get` does, timing each packet's decode (one thread: a packet is decoded when it is sent)."""
    r = PyAVReader(data)
    out = {"decode_wanted": 0.0, "decode_unused": 0.0, "rgb": 0.0, "frames_decoded": 0}
    need = sorted(set(wanted))
    sent: set[int] = set()
    cc = r._stream.codec_context
    i = r._keyframe_before(need[0])
    left = set(need)
    while i < len(r._packets) and left:
        nxt = next((f for f in need if f not in sent), None)
        if nxt is not None and r._keyframe_before(nxt) > i:
            i = r._keyframe_before(nxt)
        no = r._frame[i]
        skip = r._skip and no not in left and no not in sent
        if r._skip:
            cc.skip_frame = "NONREF" if skip else "DEFAULT"
        if no in left:
            sent.add(no)
        t0 = time.process_time()
        frames = cc.decode(r._packets[i])
        out["decode_wanted" if no in need else "decode_unused"] += time.process_time() - t0
        if left and i == len(r._packets) - 1:
            cc.skip_frame = "DEFAULT"
            frames += cc.decode(None)
        out["frames_decoded"] += len(frames)
        for f in frames:
            idx = r._index(f.pts)
            if idx in left:
                t0 = time.process_time()
                f.to_ndarray(format="rgb24")
                out["rgb"] += time.process_time() - t0
                left.discard(idx)
        i += 1
    return out


def breakdown(urls: list[str], cfg: DataConfig, clips: int, batch_clips: int, seed: int = 0) -> dict:
    """CPU milliseconds per decoded clip of every stage (see the module docstring), over `clips` clips."""
    torch.set_num_threads(1)
    reader = ShardReader(urls, cfg, 0, 1, 1, seed, 0, PassLayout(len(urls), seed, 1, 1, 0))
    pos = initial_position(0)
    gen = torch.Generator().manual_seed(seed)
    crops_of = MultiScaleCrops(cfg)
    cpu: dict[str, float] = defaultdict(float)
    split: dict[str, float] = defaultdict(float)
    pending: list[torch.Tensor] = []
    for n in range(clips):
        t = [time.process_time()]
        data, meta = parse_sample(reader.next_sample(pos))
        t.append(time.process_time())
        video = open_video(data, cfg.backend)
        t.append(time.process_time())
        idx = clip_frame_indices(video.num_frames, meta, cfg, gen)
        frames = to_tchw(video.get(sorted(set(idx))))
        t.append(time.process_time())
        pending += crops_of(frames, gen, meta)
        t.append(time.process_time())
        for stage, a, b in zip(STAGES, t[:-1], t[1:]):
            cpu[stage] += b - a
        if len(pending) == batch_clips * cfg.num_sample or n == clips - 1:
            t0 = time.process_time()
            batch = stack_channels_first(pending)
            t1 = time.process_time()
            batch.share_memory_()
            cpu["collate"] += t1 - t0
            cpu["shm"] += time.process_time() - t1
            pending = []
        for k, v in _pyav_split(data, idx).items():
            split[k] += v
    per = {k: 1e3 * cpu[k] / clips for k in STAGES}
    return {"clips": clips, "ms_per_clip": per, "total_ms": sum(per.values()),
            "decode_split_ms": {k: 1e3 * v / clips for k, v in split.items() if k != "frames_decoded"},
            "frames_decoded_per_clip": split["frames_decoded"] / clips, "frames_wanted_per_clip": cfg.num_frames}


def report(res: dict) -> str:
    per, total = res["ms_per_clip"], res["total_ms"]
    rows = [f"CPU per decoded clip, one worker ({res['clips']} clips; ms and share of the worker's time):",
            "| stage | ms per clip | share |", "|---|---|---|"]
    rows += [f"| {k} | {v:.1f} | {v / total * 100:.0f} % |" for k, v in per.items()]
    rows.append(f"| worker total | {total:.1f} | 100 % |")
    s = res["decode_split_ms"]
    rows += ["", f"decode, timed packet by packet with PyAV on the same draws: {res['frames_decoded_per_clip']:.1f} "
             f"frames decoded per clip for {res['frames_wanted_per_clip']} wanted",
             "| part | ms per clip |", "|---|---|",
             f"| decode of the wanted frames | {s['decode_wanted']:.1f} |",
             f"| decode of frames not used (references between keyframe and wanted frame) | {s['decode_unused']:.1f} |",
             f"| YUV -> RGB of the wanted frames | {s['rgb']:.1f} |"]
    return "\n".join(rows)
