"""The worker side of the loader: read each reader's samples, decode, crop, and build whole batches.

Each (rank, logical worker w) reader owns a position (see shards.py) plus counters. The position after
each batch travels with the batch to the main process, so a saved state says where every reader stands;
restoring re-opens the current piece and skips the consumed samples without decoding them. Crops use a
generator seeded by (seed, gen, rank, w, batch), so a replayed batch is bit-identical.

Crash and hang protection (the main process side is in loader.py): before decoding a sample, a worker
writes what it decodes to a small file in the loader's private folder (InFlight); quarantined keys are
skipped without decoding; workers ignore SIGTERM and die with their parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import resource
import signal
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vmae_ds.data.config import DataConfig
from vmae_ds.data.decode import DecodeError, open_video
from vmae_ds.data.nvdec import plan_clip
from vmae_ds.data.remote import READ_COUNTERS, Remote, ShardOpener, ShardUnreachable
from vmae_ds.data.sampling import segment_indices, train_indices
from vmae_ds.data.shards import (
    EpochLayout,
    Layout,
    PassLayout,
    derive_seed,
    order_seed,
    piece_order,
    settle,
    shard_name,
)
from vmae_ds.data.transforms import crop_resize_thwc, multiscale_crop_box, stack_channels_first, to_tchw

__all__ = ["ClipStream", "CorruptSample", "InFlight", "MultiScaleCrops", "ShardReader", "TransformError",
           "clip_frame_indices", "decode_clip", "derive_seed", "initial_position", "parse_sample", "prepare_worker"]

log = logging.getLogger("vmae_ds.data")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "flv", "mpg", "mpeg", "3gp", "ts")
RECENT = 8  # how many recent problems each worker keeps for stats()
COUNTERS = ("decoded", "corrupt", "quarantined", "missing", *READ_COUNTERS)
NAMED = ("bad_shards", "unreachable")  # {shard name: times}


def initial_position(worker: int, batch: int = 0, epoch: int = 0) -> dict:
    return {"worker": worker, "batch": batch, "epoch": epoch, "chunk": 0, "offset": 0,
            **dict.fromkeys(COUNTERS, 0), **{k: {} for k in NAMED}, "recent": []}


class CorruptSample(Exception):
    """A sample that is skipped and counted (bad json, no video member, undecodable video)."""


class TransformError(ValueError):
    """The per-clip transform broke its contract (count, shape or dtype of the crops): a bug, not bad data."""


def _remember(pos: dict, text: str) -> None:
    pos["recent"] = (pos["recent"] + [text[:300]])[-RECENT:]


def _bad_shard(pos: dict, name: str, text: str, warned: set[str] | None = None) -> None:
    """Count and remember a shard problem; log it once per shard and kind when `warned` is given."""
    pos["bad_shards"][name] = pos["bad_shards"].get(name, 0) + 1
    _remember(pos, f"shard {name}: {text}")
    if warned is None or f"{name}:{text[:20]}" not in warned:
        log.warning("shard %s: %s", name, text)
        if warned is not None:
            warned.add(f"{name}:{text[:20]}")


def _tar_samples(url: str, opener: ShardOpener | None, pos: dict) -> Iterator[dict]:
    with (opener or ShardOpener()).open(url, pos) as stream:
        yield from group_by_keys({**f, "__url__": url} for f in tar_file_iterator(stream))


def _lost_shard(pos: dict, name: str, e: Exception, text: str, warned: set[str] | None) -> None:
    if isinstance(e, ShardUnreachable):
        pos["unreachable"][name] = pos["unreachable"].get(name, 0) + 1
    _bad_shard(pos, name, text, warned)


def read_indexed(url: str, wanted: list[int], count: int | None, pos: dict, warned: set[str] | None = None,
                 opener: ShardOpener | None = None) -> Iterator[tuple[int, dict | None]]:
    """(local index, sample) for the `wanted` indices of one shard, in that order; (i, None) for each one the
    shard lacks. `wanted` is a block-wise permutation of ascending runs, so at most one block is buffered;
    unwanted samples are passed over without decoding. With `count` (the index's sample count) and the shard's
    last sample wanted, a shard holding more samples than the index says is named."""
    need, buf, p = set(wanted), {}, 0
    last = max(wanted, default=-1)
    name = shard_name(url)
    seen = 0
    try:
        samples = _tar_samples(url, opener, pos)
        for i, sample in enumerate(samples):
            seen = i + 1
            if i in need:
                buf[i] = sample
            if count is not None and i == count - 1 and next(samples, None) is not None:
                _bad_shard(pos, name, f"holds more samples than index.json lists ({count}); the extra ones are "
                                      "never read: rebuild the index", warned)
            while p < len(wanted) and wanted[p] in buf:
                yield wanted[p], buf.pop(wanted[p])
                p += 1
            if i >= last:
                break
    except Exception as e:  # unreadable or truncated shard: name it, count what is lost, go on
        _lost_shard(pos, name, e, f"{type(e).__name__}: {e}", warned)
    else:
        if seen <= last:
            _bad_shard(pos, name, f"ended after {seen} samples, index.json lists {count}", warned)
    if p < len(wanted):
        for i in wanted[p:]:
            yield i, buf.pop(i, None)


class ShardReader:
    """Reads one reader's samples, piece after piece, epoch after epoch, keeping `pos` exact."""

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world_size: int, workers: int, seed: int,
                 w: int, layout: Layout | None = None, opener: ShardOpener | None = None):
        self.urls, self.cfg, self.w, self.seed = urls, cfg, w, seed
        self.opener = opener or ShardOpener(Remote.of(cfg))
        self.layout = layout or PassLayout(len(urls), seed, world_size, workers, rank)
        self.counts = layout.counts if isinstance(layout, EpochLayout) else None
        self._open: tuple[int, int] | None = None
        self._name = ""
        self._it: Iterator | None = None
        self._got = 0
        self._dry_run: set[tuple[int, int, str]] = set()  # pieces in a row without a sample
        self._warned: set[str] = set()  # shard problems already logged by this reader

    def samples(self, url: str, pos: dict, shuffle_seed: int | None = None) -> Iterator[dict]:
        """The samples of a whole shard; with a seed, shuffled within blocks of cfg.shuffle_block."""
        try:
            grouped = _tar_samples(url, self.opener, pos)
            if shuffle_seed is not None and self.cfg.shuffle_block > 1:
                grouped = _block_shuffle(grouped, self.cfg.shuffle_block, shuffle_seed)
            yield from grouped
        except Exception as e:  # unreadable or truncated shard: report it by name, go on with the next
            _lost_shard(pos, shard_name(url), e, f"{type(e).__name__}: {e}; continuing with the next shard",
                        self._warned)

    def _open_piece(self, pos: dict) -> None:
        e, c = pos["epoch"], pos["chunk"]
        piece = self.layout.slice(self.w, e)[c]
        url = self.urls[piece.shard]
        seed = order_seed(self.seed, self.layout.gen, self.layout.reader(self.w), e, c)
        if piece.hi is None and piece.picks is None:  # resampled: a whole shard, length unknown
            it = self.samples(url, pos, seed)
            for _ in range(pos["offset"]):  # resume: skip consumed samples, no decoding
                if next(it, None) is None:
                    break
            self._it = ((None, s) for s in it)
        else:
            order = piece_order(piece, self.cfg.shuffle_block, seed)[pos["offset"]:]
            count = self.counts[piece.shard] if self.counts else None
            self._it = read_indexed(url, order, count, pos, self._warned, self.opener)
        self._open, self._name, self._got = (e, c), shard_name(url), 0

    def next_sample(self, pos: dict) -> dict:
        """The next raw sample (with `__shard__`); samples a damaged shard lacks are counted as missing."""
        while True:
            settle(self.layout, self.w, pos)
            if self._open != (pos["epoch"], pos["chunk"]):
                self._open_piece(pos)
            item = next(self._it, None)
            if item is None:  # a whole shard (resampled) is done
                if self._got == 0:
                    self._dry(pos)
                pos["chunk"], pos["offset"], self._open = pos["chunk"] + 1, 0, None
                continue
            pos["offset"] += 1
            sample = item[1]
            if sample is None:
                pos["missing"] += 1
                self._dry(pos)
                continue
            self._got += 1
            self._dry_run = set()
            sample["__shard__"] = self._name
            return sample

    def _dry(self, pos: dict) -> None:
        """Stop (with the names) after too many pieces in a row that gave no sample."""
        self._dry_run.add((pos["epoch"], pos["chunk"], self._name))
        if len(self._dry_run) >= self.cfg.max_bad_shards_in_a_row:
            names = sorted({n for _, _, n in self._dry_run})
            raise RuntimeError(f"reader {self.layout.reader(self.w)}: {len(self._dry_run)} shard reads in a row "
                               f"gave no sample: {names[:5]}")


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


def sample_key(sample: dict) -> str:
    """'<shard name>/<key>': what batches carry, quarantine lists hold and fault_keys name."""
    return f"{sample['__shard__']}/{sample.get('__key__', '?')}"


def clip_frame_indices(num_frames: int, meta: dict, cfg: DataConfig, gen: torch.Generator) -> list[int]:
    """The frames a training clip samples from a video of `num_frames` (within the json's frame window)."""
    start = int(meta.get("frame_start", 0))
    end = min(int(meta.get("frame_end", num_frames)), num_frames)
    if end <= start:
        raise DecodeError(f"empty frame window [{start}, {end})")
    if cfg.sampling == "segments":
        return segment_indices(start, end, cfg.num_frames, gen, cfg.segment_style)
    return train_indices(start, end, cfg.num_frames, cfg.stride_for(str(meta.get("source", ""))), gen,
                         cfg.frame_spacing or "exact")


def decode_clip(data: bytes, meta: dict, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """Decode only the sampled frames -> uint8 (T, 3, H, W)."""
    reader = open_video(data, cfg.backend)
    idx = clip_frame_indices(reader.num_frames, meta, cfg, gen)
    uniq = sorted(set(idx))
    frames = to_tchw(reader.get(uniq))
    if len(uniq) != len(idx):  # clamped clips repeat their last frame
        frames = frames[[uniq.index(i) for i in idx]]
    return frames


class MultiScaleCrops:
    """The default per-clip transform: num_sample multi-scale crops (the authors' GroupMultiScaleCrop) of
    one decoded clip, each uint8 (T, S, S, 3). Any callable with this signature can replace it."""

    def __init__(self, cfg: DataConfig, flip: bool = False):
        self.scales, self.size, self.num_sample = tuple(cfg.scales), cfg.input_size, cfg.num_sample
        self.antialias = cfg.antialias is not False  # the authors resize these crops with PIL: antialiased
        self.flip = flip  # p 0.5 per crop, the whole clip (UMT's pretraining; VideoMAE never flips)

    def __call__(self, frames: torch.Tensor, gen: torch.Generator, meta: dict) -> list[torch.Tensor]:
        h, w = frames.shape[-2:]
        if min(h, w) * min(self.scales) < 1:
            raise DecodeError(f"frames of {w}x{h} are too small to crop")
        out = []
        for _ in range(self.num_sample):
            crop = crop_resize_thwc(frames, multiscale_crop_box(h, w, self.size, self.scales, gen), self.size,
                                    self.antialias)
            if self.flip and float(torch.rand(1, generator=gen)) < 0.5:
                crop = crop.flip(2)
            out.append(crop)
        return out


class InFlight:
    """Worker side of crash/hang protection: one file per logical worker, rewritten (atomically) before and
    after each decode, so the main process can name the sample a dead or stuck worker was on."""

    def __init__(self, folder: str | None, w: int, fault_keys: dict[str, str] | None):
        self.folder, self.w, self.faults = folder, w, fault_keys or {}
        self.path = os.path.join(folder, f"w{w}.json") if folder else ""
        self.pid = os.getpid()
        if folder:
            parent = os.getppid()
            while not os.path.exists(os.path.join(folder, "go")):  # the main process is still setting up
                if os.getppid() != parent:
                    os._exit(0)
                time.sleep(0.005)
            self._write({"state": "idle"})

    def _write(self, rec: dict) -> None:
        tmp = f"{self.path}.{self.pid}.tmp"
        with open(tmp, "w") as f:
            json.dump({"w": self.w, "pid": self.pid, "t": time.monotonic(), **rec}, f)
        os.replace(tmp, self.path)

    def decoding(self, key: str) -> None:
        if self.folder:
            self._write({"state": "decoding", "key": key})
        fault = self.faults.get(key) or self.faults.get(key.split("/", 1)[-1])
        if fault and self.folder:
            _inject(fault)

    def idle(self) -> None:
        if self.folder:
            self._write({"state": "idle"})


def _inject(fault: str) -> None:
    """Test hook: behave like a decoder that segfaults or never returns."""
    if fault == "crash":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a deliberate crash
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(5)
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # "hang"
        time.sleep(3600)


def prepare_worker(parent: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore SIGTERM (a scheduler signals every process of the job; the main
    process decides what happens) and die with the parent (Linux: PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


Transform = Callable[[torch.Tensor, torch.Generator, dict], "list[torch.Tensor]"]


class ClipStream(IterableDataset):
    """Yields whole batches {video uint8 (B, 3, T, S, S), label (B,), keys [B], __pos__} forever."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, layout: Layout, videos_per_batch: int, seed: int,
                 start: list[dict], rotation: int, transform: Transform, quarantine: frozenset[str] = frozenset(),
                 records: str | None = None, fault_keys: dict[str, str] | None = None,
                 opener: ShardOpener | None = None):
        self.urls, self.cfg, self.layout, self.vpb, self.seed = urls, cfg, layout, videos_per_batch, seed
        self.opener = opener
        self.start, self.rotation, self.transform = start, rotation, transform
        self.quarantine, self.records, self.fault_keys = quarantine, records, fault_keys

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = self.layout.workers
        w = ((info.id if info else 0) + self.rotation) % workers  # DataLoader worker -> logical worker
        if info is not None:
            torch.set_num_threads(1)  # one decode thread + one op thread per worker
        flight = InFlight(self.records if info is not None else None, w, self.fault_keys)
        pos = {**initial_position(w), **json.loads(json.dumps(self.start[w]))}  # states saved before new counters
        reader = ShardReader(self.urls, self.cfg, self.layout.rank, self.layout.world, workers, self.seed, w,
                             self.layout, self.opener)
        in_a_row = 0  # corrupt samples since the last good one
        while True:
            j = pos["batch"]
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.layout.gen, self.layout.rank, w, j,
                                                            "crop"))
            clips: list[torch.Tensor] = []
            labels: list[int] = []
            keys: list[str] = []
            while len(keys) < self.vpb * self.cfg.num_sample:
                sample = reader.next_sample(pos)
                key = sample_key(sample)
                if key in self.quarantine:  # crashed or hung a decoder before: never decoded again
                    pos["quarantined"] += 1
                    continue
                flight.decoding(key)  # from here to idle(): a crash or hang names this key
                try:
                    meta, crops = self._clip(sample, gen)
                except TransformError:
                    raise
                except Exception as e:  # any bad sample is skipped and counted; training goes on
                    self._corrupt(pos, key, e)
                    in_a_row += 1
                    if in_a_row >= self.cfg.max_corrupt_in_a_row:
                        raise RuntimeError(f"reader {self.layout.reader(w)}: {in_a_row} samples in a row could not "
                                           f"be decoded/transformed; latest: {pos['recent'][-3:]}") from e
                    continue
                finally:
                    flight.idle()
                in_a_row = 0
                pos["decoded"] += 1
                clips += crops
                label = meta.get("label")
                labels += [int(label) if isinstance(label, int) else -1] * self.cfg.num_sample
                keys += [key] * self.cfg.num_sample
            pos["batch"] = j + 1
            if isinstance(self.layout, EpochLayout):
                settle(self.layout, w, pos)  # so the position says when this reader's epoch is done
            video = clips if self.cfg.backend == "nvdec" else stack_channels_first(clips)  # nvdec: ClipPlans
            yield {"video": video, "label": torch.tensor(labels, dtype=torch.long),
                   "keys": keys, "__pos__": json.loads(json.dumps(pos))}

    def _clip(self, sample: dict, gen: torch.Generator) -> tuple[dict, list[torch.Tensor]]:
        """Parse, decode, transform one sample; TransformError when the transform breaks its contract."""
        data, meta = parse_sample(sample)
        if self.cfg.backend == "nvdec":  # decoded on the GPU in the main process: only the draws are made here
            return meta, [plan_clip(data, meta, self.cfg, gen, sample_key(sample))]
        crops = self.transform(decode_clip(data, meta, self.cfg, gen), gen, meta)
        t, s = self.cfg.num_frames, self.cfg.input_size
        if len(crops) != self.cfg.num_sample or any(c.shape != (t, s, s, 3) or c.dtype != torch.uint8
                                                    for c in crops):
            got = [(tuple(c.shape), str(c.dtype)) for c in crops[:2]]
            raise TransformError(f"transform must return num_sample={self.cfg.num_sample} uint8 crops of shape "
                                 f"({t}, {s}, {s}, 3); got {len(crops)}: {got}")
        return meta, crops

    @staticmethod
    def _corrupt(pos: dict, key: str, e: Exception) -> None:
        pos["corrupt"] += 1
        _remember(pos, f"{key}: {type(e).__name__}: {e}")
        log.warning("skipped corrupt sample %s: %s", key, e)
