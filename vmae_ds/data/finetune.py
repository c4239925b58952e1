"""Fine-tuning loaders: labelled training batches, and test-time views (clips x crops) for evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vmae_ds.data.config import DataConfig
from vmae_ds.data.decode import DecodeError, open_video
from vmae_ds.data.loader import PretrainLoader
from vmae_ds.data.shards import resolve_shards
from vmae_ds.data.stream import CorruptSample, ShardReader, initial_position, log, parse_sample
from vmae_ds.data.transforms import eval_indices, spatial_views, to_tchw


def build_finetune_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                          seed: int) -> PretrainLoader:
    """Training batches {video uint8 (B, 3, T, S, S), label long (B,)}; label -1 where the json has none.

    Same stream, crops, resume and repeated augmentation as pretraining (num_sample 2 in the paper's
    fine-tuning recipe); no masks.
    """
    return PretrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                          mask_fn=None, labels=True)


class _EvalStream(IterableDataset):
    """Every sample whose global index i has i % world_size == rank; worker w reads shards s % W == w."""

    def __init__(self, urls: list[str], counts: list[int], cfg: DataConfig, rank: int, world_size: int,
                 num_clips: int, num_crops: int):
        self.urls, self.counts, self.cfg = urls, counts, cfg
        self.rank, self.world, self.num_clips, self.num_crops = rank, world_size, num_clips, num_crops

    def _views(self, sample: dict) -> tuple[torch.Tensor, int]:
        data, meta = parse_sample(sample)
        reader = open_video(data, self.cfg.backend)
        start = int(meta.get("frame_start", 0))
        end = min(int(meta.get("frame_end", reader.num_frames)), reader.num_frames)
        if end <= start:
            raise DecodeError(f"empty frame window [{start}, {end})")
        stride = self.cfg.stride_for(str(meta.get("source", "")))
        clips = eval_indices(start, end, self.cfg.num_frames, stride, self.num_clips)
        uniq = sorted({i for c in clips for i in c})
        frames = to_tchw(reader.get(uniq))
        views = [v for c in clips for v in spatial_views(frames[[uniq.index(i) for i in c]],
                                                         self.cfg.input_size, self.num_crops)]
        label = meta.get("label")
        return torch.stack(views), int(label) if isinstance(label, int) else -1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        offsets = [0]
        for c in self.counts:
            offsets.append(offsets[-1] + c)
        pos = initial_position(w)
        reader = ShardReader(self.urls, self.cfg, 0, 1, 1, 0, 0, None)
        for s in range(w, len(self.urls), workers):
            samples = reader.samples(self.urls[s], pos)
            for i in range(self.counts[s]):
                # A sample lost to a damaged shard still gives an invalid entry: all ranks stay equal.
                sample = next(samples, None)
                g = offsets[s] + i
                if g % self.world != self.rank:
                    continue
                try:
                    if sample is None:
                        raise CorruptSample(f"sample {i} of {self.urls[s]} missing (damaged shard)")
                    video, label = self._views(sample)
                    yield {"index": g, "video": video, "label": label, "valid": True}
                except Exception as e:  # unreadable clip: an invalid entry, never a crash
                    log.warning("eval: sample %d is invalid (%s)", g, e)
                    yield {"index": g, "video": None, "label": -1, "valid": False}


def _as_is(item: dict) -> dict:
    return item  # module level (not a lambda) so spawn-started workers can pickle it


class EvalLoader:
    """Test-time views for one rank: {video uint8 (B, V, 3, T, S, S), label (B,), valid (B,), index (B,)}.

    V = num_clips x num_crops (Kinetics 5 x 3, SSv2 2 x 3). Every rank yields the same number of full
    batches: padding and unreadable clips have valid=False (zeros), so collective ops never hang.
    Sum the softmax scores over V for the prediction.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                 num_clips: int = 5, num_crops: int = 3):
        self.urls, counts = resolve_shards(cfg.shards)
        if counts is None:
            raise ValueError("evaluation needs sample counts: point shards at the folder or index.json "
                             "written by vmae-shards build")
        self.counts, self.cfg, self.batch_size = counts, cfg, batch_size
        self.rank, self.world, self.num_clips, self.num_crops = rank, world_size, num_clips, num_crops
        self.total = sum(counts)
        self.invalid = 0

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.total / self.world) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        ds = _EvalStream(self.urls, self.counts, self.cfg, self.rank, self.world, self.num_clips, self.num_crops)
        nw = self.cfg.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_as_is, generator=torch.Generator())
        t, s, v = self.cfg.num_frames, self.cfg.input_size, self.num_clips * self.num_crops
        zero = torch.zeros(v, 3, t, s, s, dtype=torch.uint8)
        pad = {"index": -1, "video": None, "label": -1, "valid": False}
        items = iter(dl)  # streamed; the order is the DataLoader's fixed round-robin
        self.invalid = 0
        for _ in range(len(self)):
            chunk = [next(items, pad) for _ in range(self.batch_size)]
            self.invalid += sum(not d["valid"] for d in chunk if d["index"] >= 0)
            yield {"video": torch.stack([d["video"] if d["valid"] else zero for d in chunk]),
                   "label": torch.tensor([d["label"] for d in chunk]),
                   "valid": torch.tensor([d["valid"] for d in chunk]),
                   "index": torch.tensor([d["index"] for d in chunk])}
