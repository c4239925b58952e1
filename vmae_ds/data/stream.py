"""The per-worker sample stream: deterministic shard draws, exact positions, batches built in the worker.

Each (rank, logical worker w) owns an independent stream. Its position is four integers:
  batch   local batches already produced
  epoch   exact-epoch mode only: which epoch's shard list is being read
  chunk   how many shard draws have been started (the shard for a draw is a pure function of the seed)
  offset  samples already consumed from the current draw
The position after each batch travels with the batch to the main process, so a saved state says where
every worker stands; restoring re-opens the drawn shard and skips `offset` samples without decoding.
Crops use a generator seeded by (seed, rank, w, batch), so a replayed batch is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vmae_ds.data.config import DataConfig
from vmae_ds.data.decode import DecodeError, open_video
from vmae_ds.data.transforms import (
    crop_resize_thwc,
    multiscale_crop_box,
    stack_channels_first,
    to_tchw,
    train_indices,
)

log = logging.getLogger("vmae_ds.data")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "flv", "mpg", "mpeg", "3gp", "ts")
RECENT = 8  # how many recent problems each worker keeps for stats()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def initial_position(worker: int) -> dict:
    return {"worker": worker, "batch": 0, "epoch": 0, "chunk": 0, "offset": 0,
            "decoded": 0, "corrupt": 0, "bad_shards": {}, "recent": []}


class CorruptSample(Exception):
    """A sample that is skipped and counted (bad json, no video member, undecodable video)."""


class ShardReader:
    """Reads the samples of one logical worker's shard draws, keeping `pos` exact."""

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world_size: int, workers: int,
                 seed: int, w: int, batches_per_epoch: int | None):
        self.urls, self.cfg, self.rank, self.world, self.workers = urls, cfg, rank, world_size, workers
        self.seed, self.w, self.bpe = seed, w, batches_per_epoch
        self._open: tuple[int, int] | None = None
        self._name = ""
        self._it: Iterator[dict] | None = None

    def shard_for(self, epoch: int, chunk: int) -> str:
        if self.cfg.resampled:
            rng = random.Random(derive_seed(self.seed, self.rank, self.w, chunk, "shard"))
            return self.urls[rng.randrange(len(self.urls))]
        # Exact epochs: a fresh shard order per epoch, dealt to the world_size * workers readers;
        # a reader whose share is used up starts it again (padding, like DistributedSampler).
        order = list(range(len(self.urls)))
        random.Random(derive_seed(self.seed, epoch, "epoch")).shuffle(order)
        g, total = self.rank * self.workers + self.w, self.world * self.workers
        mine = order[g::total] or [order[g % len(order)]]
        return self.urls[mine[chunk % len(mine)]]

    def samples(self, url: str, pos: dict, shuffle_seed: int | None = None) -> Iterator[dict]:
        """The samples of one shard; with a seed, shuffled within blocks of cfg.shuffle_block."""
        name = url.rsplit("/", 1)[-1]
        try:
            with wds.gopen(url, "rb") as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                grouped = group_by_keys(files)
                if shuffle_seed is not None and self.cfg.shuffle_block > 1:
                    grouped = _block_shuffle(grouped, self.cfg.shuffle_block, shuffle_seed)
                yield from grouped
        except Exception as e:  # unreadable or truncated shard: report it by name, go on with the next
            pos["bad_shards"][name] = pos["bad_shards"].get(name, 0) + 1
            _remember(pos, f"shard {name}: {type(e).__name__}: {e}")
            log.warning("cannot read shard %s (%s: %s); continuing with the next shard", url,
                        type(e).__name__, e)

    def next_sample(self, pos: dict) -> dict:
        empty_draws: list[str] = []
        while True:
            if self._open != (pos["epoch"], pos["chunk"]):
                url = self.shard_for(pos["epoch"], pos["chunk"])
                seed = derive_seed(self.seed, self.rank, self.w, pos["epoch"], pos["chunk"], "order")
                self._it, self._open = self.samples(url, pos, seed), (pos["epoch"], pos["chunk"])
                self._name = url.rsplit("/", 1)[-1]
                for _ in range(pos["offset"]):  # resume: skip consumed samples, no decoding
                    if next(self._it, None) is None:
                        break
            sample = next(self._it, None)
            if sample is not None:
                pos["offset"] += 1
                sample["__shard__"] = self._name
                return sample
            if pos["offset"] == 0:
                empty_draws.append(self._name)
                if len(empty_draws) >= self.cfg.max_bad_shards_in_a_row:
                    raise RuntimeError(f"rank {self.rank} worker {self.w}: {len(empty_draws)} shard draws in a "
                                       f"row gave no sample: {sorted(set(empty_draws))[:5]}")
            pos["chunk"], pos["offset"] = pos["chunk"] + 1, 0


def _block_shuffle(samples: Iterator[dict], block: int, seed: int) -> Iterator[dict]:
    """Permute each run of `block` samples. A pure function of (shard, seed), so a resumed reader that
    re-reads the shard and skips `offset` samples lands on exactly the same next sample."""
    rng = random.Random(seed)
    buf: list[dict] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) == block:
            rng.shuffle(buf)
            yield from buf
            buf = []
    rng.shuffle(buf)
    yield from buf


def _remember(pos: dict, text: str) -> None:
    pos["recent"] = (pos["recent"] + [text[:300]])[-RECENT:]


def parse_sample(sample: dict) -> tuple[bytes, dict]:
    """(video bytes, metadata) of a raw webdataset sample; CorruptSample says what is wrong."""
    videos = [e for e in VIDEO_EXTS if e in sample]
    if not videos:
        raise CorruptSample(f"no video member (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptSample(f"bad json: {e}") from None
    if not isinstance(meta, dict):
        raise CorruptSample("json is not an object")
    return sample[videos[0]], meta


def decode_clip(data: bytes, meta: dict, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """Decode only the sampled frames -> uint8 (T, 3, H, W)."""
    reader = open_video(data, cfg.backend)
    start = int(meta.get("frame_start", 0))
    end = min(int(meta.get("frame_end", reader.num_frames)), reader.num_frames)
    if end <= start:
        raise DecodeError(f"empty frame window [{start}, {end})")
    idx = train_indices(start, end, cfg.num_frames, cfg.stride_for(str(meta.get("source", ""))), gen)
    uniq = sorted(set(idx))
    frames = to_tchw(reader.get(uniq))
    if len(uniq) != len(idx):  # clamped clips repeat their last frame
        frames = frames[[uniq.index(i) for i in idx]]
    return frames


def augment(frames: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Repeated augmentation: num_sample multi-scale crops of one decoded clip, each (T, S, S, 3) uint8."""
    h, w = frames.shape[-2:]
    if min(h, w) * min(cfg.scales) < 1:
        raise DecodeError(f"frames of {w}x{h} are too small to crop")
    return [crop_resize_thwc(frames, multiscale_crop_box(h, w, cfg.input_size, cfg.scales, gen), cfg.input_size)
            for _ in range(cfg.num_sample)]


class ClipStream(IterableDataset):
    """Yields whole batches {video uint8 (B, 3, T, S, S), label (B,), __pos__} forever."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, videos_per_batch: int, rank: int,
                 world_size: int, seed: int, start: list[dict], rotation: int,
                 batches_per_epoch: int | None):
        self.urls, self.cfg, self.vpb = urls, cfg, videos_per_batch
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start, self.rotation, self.bpe = start, rotation, batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = max(self.cfg.num_workers, 1)
        w = ((info.id if info else 0) + self.rotation) % workers  # DataLoader worker -> logical worker
        if info is not None:
            torch.set_num_threads(1)  # one decode thread + one op thread per worker
        pos = json.loads(json.dumps(self.start[w]))
        reader = ShardReader(self.urls, self.cfg, self.rank, self.world, workers, self.seed, w, self.bpe)
        while True:
            j = pos["batch"]
            if self.bpe is not None:
                epoch = (j * workers + w) // self.bpe  # global batch index -> epoch
                if epoch != pos["epoch"]:
                    pos.update(epoch=epoch, chunk=0, offset=0)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, w, j, "crop"))
            clips: list[torch.Tensor] = []
            labels: list[int] = []
            while len(clips) < self.vpb * self.cfg.num_sample:
                sample = reader.next_sample(pos)
                key = sample.get("__key__", "?")
                try:
                    data, meta = parse_sample(sample)
                    crops = augment(decode_clip(data, meta, self.cfg, gen), self.cfg, gen)
                except Exception as e:  # any bad sample is skipped and counted; training goes on
                    pos["corrupt"] += 1
                    shard = sample["__shard__"]
                    _remember(pos, f"{shard}:{key}: {type(e).__name__}: {e}")
                    log.warning("skipped corrupt sample %s in %s: %s", key, shard, e)
                    continue
                pos["decoded"] += 1
                clips += crops
                label = meta.get("label")
                labels += [int(label) if isinstance(label, int) else -1] * len(crops)
            pos["batch"] = j + 1
            yield {"video": stack_channels_first(clips), "label": torch.tensor(labels, dtype=torch.long),
                   "__pos__": json.loads(json.dumps(pos))}
