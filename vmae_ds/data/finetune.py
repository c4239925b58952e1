"""Fine-tuning loaders: labelled training batches, and test-time views (clips x crops) for evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vmae_ds.data.config import DataConfig
from vmae_ds.data.decode import DecodeError, open_video
from vmae_ds.data.loader import PretrainLoader, WorkerSupervisor
from vmae_ds.data.nvdec import NvdecUnavailable
from vmae_ds.data.remote import Remote, ShardOpener
from vmae_ds.data.sampling import eval_indices, eval_segment_indices
from vmae_ds.data.shards import EpochLayout, config_shards, shard_name
from vmae_ds.data.stream import InFlight, Transform, initial_position, log, parse_sample, read_indexed
from vmae_ds.data.transforms import spatial_views, to_tchw


def build_finetune_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                          transform: Transform | None = None, quarantine: Iterable[str] = (),
                          fault_keys: dict[str, str] | None = None) -> PretrainLoader:
    """Training batches {video uint8 (B, 3, T, S, S), label long (B,), keys [B]}; label -1 where the json has
    none.

    Same stream, epochs, resume and crash protection as pretraining; no masks. `transform(frames, gen, meta)`
    turns one decoded clip (uint8 (T, 3, H, W)) into num_sample uint8 (T, S, S, 3) views using only `gen`
    for randomness; it must be picklable (it runs in the workers). Default: multi-scale crops x num_sample.
    """
    return PretrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                          mask_fn=None, labels=True, transform=transform, quarantine=quarantine,
                          fault_keys=fault_keys)


class _EvalStream(IterableDataset):
    """This rank's contiguous share of all samples in index order, cut into one contiguous run per worker.
    Every sample gives exactly one item (invalid when it cannot be read), so ranks stay equal."""

    def __init__(self, urls: list[str], counts: list[int], layout: EpochLayout, cfg: DataConfig, num_clips: int,
                 num_crops: int, skip: list[int], quarantine: frozenset[str], records: str | None,
                 fault_keys: dict[str, str] | None, opener: ShardOpener | None = None):
        self.urls, self.counts, self.layout, self.cfg = urls, counts, layout, cfg
        self.num_clips, self.num_crops, self.skip = num_clips, num_crops, skip
        self.quarantine, self.records, self.fault_keys = quarantine, records, fault_keys
        self.opener = opener

    def _views(self, sample: dict) -> tuple[torch.Tensor, int]:
        data, meta = parse_sample(sample)
        reader = open_video(data, self.cfg.backend)
        start = int(meta.get("frame_start", 0))
        end = min(int(meta.get("frame_end", reader.num_frames)), reader.num_frames)
        if end <= start:
            raise DecodeError(f"empty frame window [{start}, {end})")
        if self.cfg.sampling == "segments":
            clips = eval_segment_indices(start, end, self.cfg.num_frames, self.num_clips, self.cfg.segment_style)
        else:
            stride = self.cfg.stride_for(str(meta.get("source", "")))
            clips = eval_indices(start, end, self.cfg.num_frames, stride, self.num_clips, self.cfg.stride_views)
        uniq = sorted({i for c in clips for i in c})
        frames = to_tchw(reader.get(uniq))
        antialias = bool(self.cfg.antialias)  # null: the authors' test views are resized without antialiasing
        views = [v for c in clips for v in spatial_views(frames[[uniq.index(i) for i in c]],
                                                         self.cfg.input_size, self.num_crops, antialias)]
        label = meta.get("label")
        return torch.stack(views), int(label) if isinstance(label, int) else -1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = info.id if info else 0
        if info is not None:
            torch.set_num_threads(1)
        flight = InFlight(self.records if info is not None else None, w, self.fault_keys)
        offsets = [0]
        for c in self.counts:
            offsets.append(offsets[-1] + c)
        pos = initial_position(w)
        n = 0
        for piece in self.layout.slice(w, 0):
            url = self.urls[piece.shard]
            for i, sample in read_indexed(url, list(piece.indices()), self.counts[piece.shard], pos,
                                            opener=self.opener):
                n += 1
                if n <= self.skip[w]:  # delivered before a worker restart
                    continue
                key = f"{shard_name(url)}/{sample.get('__key__', '?') if sample else f'#{i}'}"
                yield self._item(offsets[piece.shard] + i, key, sample, flight) | {"__w__": w}

    def _item(self, g: int, key: str, sample: dict | None, flight: InFlight) -> dict:
        invalid = {"index": g, "key": key, "video": None, "label": -1, "valid": False}
        if sample is None:
            log.warning("eval: sample %d (%s) is missing (damaged shard)", g, key)
            return invalid
        if key in self.quarantine:
            return invalid
        flight.decoding(key)
        try:
            video, label = self._views(sample)
        except Exception as e:  # unreadable clip: an invalid entry, never a crash
            log.warning("eval: sample %d (%s) is invalid (%s)", g, key, e)
            return invalid
        finally:
            flight.idle()
        return {"index": g, "key": key, "video": video, "label": label, "valid": True}


def capped_counts(counts: list[int], cap: int | None) -> list[int]:
    """Per shard, how many of its first samples to read so that they sum to min(cap, total), in proportion to
    the shard sizes (largest remainders first, ties to the earlier shard)."""
    total = sum(counts)
    if cap is None or cap >= total:
        return list(counts)
    share = [c * cap // total for c in counts]
    rest = sorted(range(len(counts)), key=lambda s: (-(counts[s] * cap % total), s))
    for s in rest[:cap - sum(share)]:
        share[s] += 1
    return share


def _as_is(item: dict) -> dict:
    return item  # module level (not a lambda) so spawn-started workers can pickle it


class EvalLoader:
    """Test-time views for one rank: {video uint8 (B, V, 3, T, S, S), label (B,), valid (B,), index (B,),
    keys [B]}.

    V = num_clips x num_crops (Kinetics 5 x 3, SSv2 2 x 3). `max_samples`: read only that many videos, the same
    share of every shard (its first ones), so a probe set stays spread over the shards. Every video is in
    exactly one rank's batches (ranks get contiguous near-equal shares of the index order). Every rank yields
    the same number of full batches: padding and unreadable clips have valid=False (zeros, key ''/the sample's
    key), so collective ops never hang. A clip that crashes or hangs its decoder is quarantined, counted
    invalid, and the workers restart where they were. Sum the softmax scores over V for the prediction.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                 num_clips: int = 5, num_crops: int = 3, quarantine: Iterable[str] = (),
                 fault_keys: dict[str, str] | None = None, max_samples: int | None = None):
        if cfg.backend == "nvdec":
            raise NvdecUnavailable("data.backend nvdec is for the training loaders; EvalLoader decodes its "
                                   "test-time views in the workers: use backend pyav or decord")
        shard_set = config_shards(cfg)
        self.urls, counts = shard_set.urls, shard_set.counts
        self.opener = ShardOpener(Remote.of(cfg), shard_set.sizes)
        if counts is None:
            raise ValueError("evaluation needs sample counts: point shards at the folder or index.json "
                             "written by vmae-shards build")
        if fault_keys and cfg.num_workers == 0:
            raise ValueError("fault_keys need num_workers >= 1 (a crash in the main process cannot be survived)")
        self.counts, self.cfg, self.batch_size = counts, cfg, batch_size
        self.rank, self.world, self.num_clips, self.num_crops = rank, world_size, num_clips, num_crops
        read = capped_counts(counts, max_samples)  # indices keep their place in the whole set
        self.total = sum(read)
        self.layout = EpochLayout(read, 0, world_size, max(cfg.num_workers, 1), rank, shuffle=False)
        self.quarantine, self.fault_keys = set(quarantine), dict(fault_keys or {})
        self.invalid = 0
        self.crashed: list[str] = []
        self.hung: list[str] = []

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.total / self.world) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        workers = max(self.cfg.num_workers, 1)
        delivered = [0] * workers

        def make(records: str | None, quarantine: frozenset[str]) -> _EvalStream:
            return _EvalStream(self.urls, self.counts, self.layout, self.cfg, self.num_clips, self.num_crops,
                               list(delivered), quarantine, records, self.fault_keys, self.opener)

        sup = WorkerSupervisor(make, num_workers=self.cfg.num_workers, prefetch_factor=self.cfg.prefetch_factor,
                               pin_memory=False, decode_timeout_s=self.cfg.decode_timeout_s,
                               what=f"eval rank {self.rank}", quarantine=self.quarantine, collate_fn=_as_is)

        def items() -> Iterator[dict]:
            while True:
                try:
                    item = sup.next()
                except StopIteration:
                    return
                delivered[item.pop("__w__")] += 1
                yield item

        t, s, v = self.cfg.num_frames, self.cfg.input_size, self.num_clips * self.num_crops
        zero = torch.zeros(v, 3, t, s, s, dtype=torch.uint8)
        pad = {"index": -1, "key": "", "video": None, "label": -1, "valid": False}
        stream = items()
        self.invalid = 0
        try:
            for _ in range(len(self)):
                chunk = [next(stream, pad) for _ in range(self.batch_size)]
                self.invalid += sum(not d["valid"] for d in chunk if d["index"] >= 0)
                yield {"video": torch.stack([d["video"] if d["valid"] else zero for d in chunk]),
                       "label": torch.tensor([d["label"] for d in chunk]),
                       "valid": torch.tensor([d["valid"] for d in chunk]),
                       "index": torch.tensor([d["index"] for d in chunk]),
                       "keys": [d["key"] for d in chunk]}
        finally:
            sup.close()
            self.quarantine |= sup.quarantine
            self.crashed += [k for k in sup.crashed if k not in self.crashed]
            self.hung += [k for k in sup.hung if k not in self.hung]

    def stats(self) -> dict:
        """Invalid views of the last pass, and the keys that crashed or hung a decoder (quarantined)."""
        return {"invalid": self.invalid, "crashed": list(self.crashed), "hung": list(self.hung),
                "quarantine": sorted(self.quarantine)}
