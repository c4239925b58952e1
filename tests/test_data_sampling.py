"""Sampling without replacement on real shards of uneven sizes (7, 3, 11, 1 clips).

Exact epochs: every key exactly once per epoch across 2 ranks x 2 workers, batches straddle epochs.
Resampled: every reader sees every shard before any repeat. Resume mid-epoch is bit-exact. Plus a
pure-Python property check of the epoch layout over many random shard sizes and rank/worker counts.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from data_helpers import SIZES, all_keys, uneven_shards

from vmae_ds.data import DataConfig, build_pretrain_loader, default_mask_fn, token_grid
from vmae_ds.data.shards import EpochLayout, PassLayout, order_seed, piece_order, settle
from vmae_ds.data.stream import initial_position


def cfg_for(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), num_frames=4, sampling_rate=2, input_size=32, num_sample=1, num_workers=2,
                shuffle_block=4)
    return DataConfig(**{**base, **kw})


def loader_for(cfg: DataConfig, rank: int = 0, world: int = 1, batch: int = 1, **kw):
    return build_pretrain_loader(cfg, batch_size=batch, rank=rank, world_size=world, seed=11,
                                 mask_fn=default_mask_fn(token_grid(cfg, patch=8)), **kw)


def endless(loader):
    while True:
        yield from loader


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(endless(loader), n))


def keys_of(batches: list[dict]) -> Counter:
    return Counter(k for b in batches for k in b["keys"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return uneven_shards(tmp_path_factory)


def test_one_exact_epoch_over_two_ranks_and_two_workers_reads_every_key_once(shards):
    cfg = cfg_for(shards)
    loaders = [loader_for(cfg, rank=r, world=2) for r in (0, 1)]
    epochs = []
    for _ in range(2):
        batches = [b for ld in loaders for b in take(ld, 11)]  # 22 clips / 2 ranks, one clip per batch
        assert all(len(b["keys"]) == 1 and b["video"].shape == (1, 3, 4, 32, 32) for b in batches)
        assert keys_of(batches) == all_keys()
        epochs.append([k for b in batches for k in b["keys"]])
    for ld in loaders:
        assert len(ld) == 11 and ld.epoch == 2 and ld.progress()["epoch_samples_read"] == 0
        ld.close()
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_batches_straddle_epochs_and_stay_full(shards):
    cfg = cfg_for(shards)
    loaders = [loader_for(cfg, rank=r, world=2, batch=2) for r in (0, 1)]
    per_rank = [take(ld, 11) for ld in loaders]  # 2 x 11 x 2 clips = exactly two epochs
    for ld in loaders:
        assert len(ld) == 5 and ld.epoch == 2 and ld.progress()["epoch_samples_read"] == 0
        ld.close()
    assert all(len(b["keys"]) == 2 for bs in per_rank for b in bs)
    assert keys_of([b for bs in per_rank for b in bs]) == all_keys() + all_keys()
    # each rank's share of an epoch is 11 clips: its 6th batch holds the last of epoch 0 and the first of epoch 1
    head = keys_of([b for bs in per_rank for b in bs[:6]])
    assert set(head) == set(all_keys()) and sum(head.values()) == 24


def test_resampled_readers_see_every_shard_before_any_repeat(shards):
    cfg = cfg_for(shards, resampled=True)
    firsts = set()
    for rank in (0, 1):
        loader = loader_for(cfg, rank=rank, world=2)
        with pytest.raises(TypeError):
            len(loader)
        batches = take(loader, 2 * sum(SIZES))  # one pass for each of the rank's two readers
        loader.close()
        for w in (0, 1):  # batch k of a rank comes from worker k % 2
            seq = [b["keys"][0] for b in batches[w::2]]
            assert Counter(seq) == all_keys()  # the whole pass: every sample of every shard once
            shards_in_order = [k.split("/")[0] for k, _ in itertools.groupby(seq, key=lambda k: k.split("/")[0])]
            assert len(shards_in_order) == len(SIZES)  # each shard read in one go, none twice
            firsts.add(shards_in_order[0])
    assert len(firsts) == len(SIZES)  # 4 readers start on 4 different shards: all covered in 1/4 of a pass


@pytest.mark.parametrize("workers", [2, 0])
def test_restore_mid_epoch_gives_identical_batches(shards, workers):
    cfg = cfg_for(shards, num_workers=workers, num_sample=2)
    loader = loader_for(cfg, rank=1, world=2, batch=4)  # 2 clips x 2 crops
    stream = endless(loader)
    head = [next(stream) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [next(stream) for _ in range(9)]  # crosses two epoch ends (5 batches per epoch)
    loader.close()
    restored = loader_for(cfg, rank=1, world=2, batch=4)
    assert restored.load_state_dict(state) == []
    again = take(restored, 9)
    restored.close()
    for a, b in zip(rest, again, strict=True):
        assert a["keys"] == b["keys"]
        assert all(torch.equal(a[k], b[k]) for k in ("video", "encoder_mask", "decoder_mask"))
    assert head[0]["keys"][0] == head[0]["keys"][1]  # the two crops of a clip share its key


def test_exact_epochs_count_and_name_samples_a_shard_lacks_or_adds(shards, tmp_path):
    (tmp_path / "index.json").write_text((shards / "index.json").read_text())  # still says 7, 3, 11, 1
    for s in range(len(SIZES)):
        src = list(wds.WebDataset(str(shards / f"uneven-{s:06d}.tar"), shardshuffle=False, empty_check=False))
        if s == 0:  # two samples the index does not list
            src += [{**src[0], "__key__": "zz_extra_a"}, {**src[1], "__key__": "zz_extra_b"}]
        if s == 2:  # cut short: the last 3 of 11 are gone
            src = src[:8]
        with wds.TarWriter(str(tmp_path / f"uneven-{s:06d}.tar"), encoder=False) as w:
            for x in src:
                w.write({k: x[k] for k in ("__key__", "mp4", "json")})
    loader = loader_for(cfg_for(tmp_path, num_workers=0))
    stream = endless(loader)
    lost = Counter(f"uneven-000002.tar/s2_{i:02d}" for i in (8, 9, 10))
    got = keys_of([next(stream) for _ in range(sum(SIZES) - 3)])
    assert got == all_keys() - lost  # the listed samples once, the unlisted extras never
    next(stream)  # the lost ones are found missing by reading on, at the latest here
    stats = loader.stats()
    assert loader.epoch == 1
    assert stats["missing_samples"] == 3 and {"uneven-000000.tar", "uneven-000002.tar"} <= set(stats["bad_shards"])
    problems = "\n".join(stats["recent_problems"])
    assert "more samples than index.json lists (7)" in problems and "ended after 8 samples" in problems


def read_reader(layout, w: int, pos: dict, block: int) -> tuple[int, tuple[int, int]]:
    """What a reader reads next, from the layout alone: (epoch, (shard, local index))."""
    settle(layout, w, pos)
    e, c, o = pos["epoch"], pos["chunk"], pos["offset"]
    piece = layout.slice(w, e)[c]
    pos["offset"] += 1
    return e, (piece.shard, piece_order(piece, block, order_seed(layout.seed, layout.gen, layout.reader(w), e, c))[o])


def test_epoch_layout_property_on_random_sizes():
    """Any shard sizes, ranks, workers, clips per batch: reading each rank's share of an epoch in batch turns
    (batch k from worker k % workers, vpb clips) gives every sample once and ends exactly at the epoch."""
    rng = random.Random(0)
    for _ in range(150):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
        if not sum(counts):
            continue
        world, workers, vpb, block = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 3, 16])
        layouts = [EpochLayout(counts, 5, world, workers, r, vpb=vpb) for r in range(world)]
        pos = [[initial_position(w) for w in range(workers)] for _ in range(world)]
        everything = Counter((s, i) for s, n in enumerate(counts) for i in range(n))
        clock = [0] * world  # samples each rank has read
        for epoch in range(3):
            got = Counter()
            shares = [layouts[r].rank_share(epoch) for r in range(world)]
            assert max(shares) - min(shares) <= 1
            for r in range(world):
                for _ in range(shares[r]):
                    w = clock[r] // vpb % workers
                    e, sample = read_reader(layouts[r], w, pos[r][w], block)
                    assert e == epoch  # the rank's share ends exactly at its epoch boundary
                    got[sample] += 1
                    clock[r] += 1
            assert got == everything


def test_pass_layout_rotates_reader_offsets():
    for num_shards in range(1, 9):
        for world, workers in [(1, 1), (2, 2), (3, 2), (1, 3)]:
            starts = set()
            for r in range(world):
                layout = PassLayout(num_shards, 3, world, workers, r)
                for w in range(workers):
                    order = [p.shard for p in layout.slice(w, 0)]
                    assert sorted(order) == list(range(num_shards))
                    starts |= set(order[:-(-num_shards // (world * workers))])
                    passes = {tuple(p.shard for p in layout.slice(w, q)) for q in range(5)}
                    assert len(passes) > 1 or num_shards < 3  # a new permutation each pass
            assert starts == set(range(num_shards))
