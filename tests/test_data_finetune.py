"""Fine-tuning mode: labels from the sample json, and test-time views (clips x crops) split over ranks."""

from __future__ import annotations

import pytest
import torch
from data_helpers import build, make_corpus, shared_dir

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
        assert set(b) == {"video", "label"} and b["label"].dtype == torch.long
        assert b["video"].shape == (4, 3, 4, 32, 32)
        assert b["label"][0] == b["label"][1]  # the two repeats of one clip share its label
    assert {int(x) for b in batches for x in b["label"]} <= {0, 1, 2}  # labels written by the corpus


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
