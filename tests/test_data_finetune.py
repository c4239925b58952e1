"""Fine-tuning mode: labels from the sample json, and test-time views (clips x crops) split over ranks."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import all_keys, build, make_corpus, shared_dir, uneven_shards

from vmae_ds.data import DataConfig, EvalLoader, build_finetune_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    corpus = make_corpus(shared_dir(tmp_path_factory, "data_corpus"))
    return build(corpus, shared_dir(tmp_path_factory, "data_shards", create=False))


def cfg(shards, **kw) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "num_frames": 4, "sampling_rate": 2, "input_size": 32,
                         "num_sample": 2, "num_workers": 2, **kw})


def test_finetune_batches_carry_labels(shards):
    loader = build_finetune_loader(cfg(shards), batch_size=4, rank=0, world_size=1, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    loader.close()
    for b in batches:
        assert set(b) == {"video", "label", "keys"} and b["label"].dtype == torch.long
        assert b["video"].shape == (4, 3, 4, 32, 32)
        assert b["label"][0] == b["label"][1]  # the two repeats of one clip share its label
        assert len(b["keys"]) == 4 and b["keys"][0] == b["keys"][1] and b["keys"][0].split("/")[0].endswith(".tar")
    assert {int(x) for b in batches for x in b["label"]} <= {0, 1, 2}  # labels written by the corpus


class LabelPaint:
    """A stand-in transform: views painted with (label + 1) * 40 plus a generator draw, at the config's size."""

    def __init__(self, frames: int, size: int, views: int):
        self.frames, self.size, self.views = frames, size, views

    def __call__(self, clip: torch.Tensor, gen: torch.Generator, meta: dict) -> list[torch.Tensor]:
        value = (meta["label"] + 1) * 40 + int(torch.randint(0, 3, (1,), generator=gen))
        return [torch.full((self.frames, self.size, self.size, 3), value, dtype=torch.uint8)
                for _ in range(self.views)]

    def broken(self, clip: torch.Tensor, gen: torch.Generator, meta: dict) -> list[torch.Tensor]:
        return self(clip, gen, {})  # no label: KeyError on every clip


def test_finetune_transform_is_pluggable(shards):
    loader = build_finetune_loader(cfg(shards), batch_size=4, rank=0, world_size=1, seed=0,
                                   transform=LabelPaint(4, 32, 2))
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    loader.close()
    for b in batches:
        for video, label in zip(b["video"], b["label"], strict=True):
            assert 0 <= int(video.flatten()[0]) - (int(label) + 1) * 40 < 3 and video.unique().numel() == 1
    wrong = build_finetune_loader(cfg(shards, num_workers=0), batch_size=4, rank=0, world_size=1, seed=0,
                                  transform=LabelPaint(4, 32, 3))
    with pytest.raises(ValueError, match="transform must return num_sample=2 uint8 crops"):
        next(iter(wrong))
    broken = build_finetune_loader(cfg(shards, num_workers=0, max_corrupt_in_a_row=5), batch_size=4, rank=0,
                                   world_size=1, seed=0, transform=LabelPaint(4, 32, 2).broken)
    with pytest.raises(RuntimeError, match="5 samples in a row could not be decoded/transformed; latest: .*KeyError"):
        next(iter(broken))  # stops, naming the errors, instead of skipping every sample forever


def test_eval_on_uneven_shards_reads_every_video_once_over_two_ranks(tmp_path_factory):
    shards = uneven_shards(tmp_path_factory)  # 7, 3, 11 and 1 clips
    per_rank = [list(EvalLoader(cfg(shards), batch_size=4, rank=r, world_size=2, num_clips=1, num_crops=1))
                for r in (0, 1)]
    assert [len(bs) for bs in per_rank] == [3, 3]  # ceil(11 / 4) on both ranks
    seen = [(int(i), k) for bs in per_rank for b in bs for i, k, v in zip(b["index"], b["keys"], b["valid"],
                                                                         strict=True) if v]
    assert sorted(i for i, _ in seen) == list(range(22))
    assert sorted(k for _, k in seen) == sorted(all_keys())
    index = json.loads((shards / "index.json").read_text())["shards"]
    starts = [sum(e["samples"] for e in index[:s]) for s in range(len(index))]
    for i, k in seen:  # the index is the position in index.json order: shard offset + local position
        s, local = int(k.split("/")[1][1]), int(k.split("_")[-1])
        assert i == starts[s] + local


def test_eval_views_cover_every_clip_once_with_equal_batches_per_rank(shards):
    per_rank = []
    for rank in (0, 1, 2):
        loader = EvalLoader(cfg(shards), batch_size=4, rank=rank, world_size=3, num_clips=2, num_crops=3)
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # ceil(ceil(16 / 3) / 4) on every rank
        for b in batches:
            assert b["video"].shape == (4, 6, 3, 4, 32, 32) and b["video"].dtype == torch.uint8
        per_rank.append(batches)
        assert loader.invalid == 0
    valid = [int(i) for bs in per_rank for b in bs for i, v in zip(b["index"], b["valid"]) if v]
    assert sorted(valid) == list(range(16))
    padded = sum(int((~b["valid"]).sum()) for bs in per_rank for b in bs)
    assert padded == 3 * 8 - 16
    first = per_rank[0][0]["video"][0]  # two temporal clips x three crops differ from each other
    assert len({v.sum().item() for v in first}) == 6
