"""Elastic resume: the saved states of all old ranks continue on another world size or num_workers, and the
rest of the current epoch is read exactly once (real shards of 7, 3, 11 and 1 clips; one clip per batch)."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter

import pytest
from data_helpers import all_keys, uneven_shards
from test_data_sampling import cfg_for, endless, keys_of, loader_for, read_reader

from vmae_ds.data import LoaderStateError
from vmae_ds.data.shards import EpochLayout, OldReader, deal, settle, turn_split, unread
from vmae_ds.data.stream import initial_position


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return uneven_shards(tmp_path_factory)


def saved(loaders, n: int) -> tuple[list[dict], Counter]:
    """Read n batches on every loader, return their (JSON round-tripped) states and the keys read."""
    read = Counter()
    for ld in loaders:
        read += keys_of(list(itertools.islice(endless(ld), n)))
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
    for ld in loaders:
        ld.close()
    return states, read


def rest_of_epoch(loader) -> tuple[Counter, object]:
    """Batches until the loader's epoch advances; returns their keys and the live batch stream."""
    stream, start, got = endless(loader), loader.epoch, Counter()
    while loader.epoch == start:
        got += keys_of([next(stream)])
    return got, stream


def test_two_ranks_to_one_mid_epoch(shards):
    cfg = cfg_for(shards)
    states, read = saved([loader_for(cfg, rank=r, world=2) for r in (0, 1)], 4)
    new = loader_for(cfg, world=1)
    lines = new.load_elastic(states)
    assert "2 rank(s) x 2 worker(s) as 1 rank(s) x 2 worker(s)" in lines[0]
    assert any("epoch 0: 14 samples not yet read" in line for line in lines)
    rest, stream = rest_of_epoch(new)
    assert rest + read == all_keys()  # none skipped, none repeated
    assert keys_of([next(stream) for _ in range(len(new))]) == all_keys()  # the next epoch, new split
    new.close()


def test_one_rank_to_two_mid_epoch(shards):
    cfg = cfg_for(shards)
    states, read = saved([loader_for(cfg, world=1)], 5)
    news = [loader_for(cfg, rank=r, world=2) for r in (0, 1)]
    rests, streams = zip(*[(ld.load_elastic(states), rest_of_epoch(ld))[1] for ld in news], strict=True)
    assert sum(rests, Counter()) + read == all_keys()
    assert sum(rests, Counter()).total() == 17
    assert sum((keys_of([next(s) for _ in range(len(ld))]) for s, ld in zip(streams, news, strict=True)),
               Counter()) == all_keys()
    for ld in news:
        ld.close()


def test_num_workers_change_on_resume_rereads_nothing(shards):
    cfg = cfg_for(shards)
    states, read = saved([loader_for(cfg, rank=r, world=2) for r in (0, 1)], 3)
    news = [loader_for(cfg.model_copy(update={"num_workers": 1}), rank=r, world=2) for r in (0, 1)]
    lines = [ld.load_state_dict(s) for ld, s in zip(news, states, strict=True)]  # each rank alone, as the engine
    assert all("as 2 rank(s) x 1 worker(s) (this rank's samples only" in ls[0] for ls in lines)
    rests, streams = zip(*[rest_of_epoch(ld) for ld in news], strict=True)
    assert sum(rests, Counter()) + read == all_keys()
    assert sum((keys_of([next(s) for _ in range(len(ld))]) for s, ld in zip(streams, news, strict=True)),
               Counter()) == all_keys()
    for ld in news:
        ld.close()


def test_resampled_mode_continues_with_fresh_passes(shards):
    cfg = cfg_for(shards, resampled=True, num_workers=0)
    states, _ = saved([loader_for(cfg, rank=r, world=2) for r in (0, 1)], 3)
    new = loader_for(cfg, world=1)
    lines = new.load_elastic(states)
    assert any("fresh passes at pass 1" in line for line in lines)
    first_pass = keys_of(list(itertools.islice(endless(new), sum(all_keys().values()))))
    assert first_pass == all_keys()  # one reader: a whole fresh pass, every sample once


def test_same_layout_is_an_exact_resume_and_wrong_states_are_refused(shards):
    cfg = cfg_for(shards, num_workers=0)
    states, _ = saved([loader_for(cfg, rank=r, world=2) for r in (0, 1)], 2)
    a, b = loader_for(cfg, rank=1, world=2), loader_for(cfg, rank=1, world=2)
    assert "exact resume" in a.load_elastic(states)[0]
    b.load_state_dict(states[1])
    assert [x["keys"] for x in itertools.islice(endless(a), 4)] == [x["keys"] for x in itertools.islice(endless(b), 4)]
    with pytest.raises(LoaderStateError, match="world_size is 2 in the state, 1 here; .*load_elastic"):
        loader_for(cfg, world=1).load_state_dict(states[0])
    with pytest.raises(LoaderStateError, match="one state per rank .* got ranks \\[0\\]"):
        loader_for(cfg, world=1).load_elastic(states[:1])
    other = copy.deepcopy(states[0]) | {"seed": 99}
    with pytest.raises(LoaderStateError, match="seed is 99 in the state, 11 here"):
        loader_for(cfg, rank=0, world=2).load_state_dict(other)


def test_redeal_property_on_random_layouts():
    """Random shard sizes, old and new ranks / workers / clips per batch, random stopping point: the re-dealt
    rest of every begun epoch plus what was read is every sample once, and later epochs are whole."""
    rng = random.Random(1)
    for _ in range(120):
        counts = [rng.randint(1, 9) for _ in range(rng.randint(1, 5))]
        everything = Counter((s, i) for s, n in enumerate(counts) for i in range(n))
        world, workers, vpb, block = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2), rng.choice([1, 4])
        old = [EpochLayout(counts, 7, world, workers, r, vpb=vpb) for r in range(world)]
        pos = [[initial_position(w) for w in range(workers)] for _ in range(world)]
        seen = Counter()
        batches = rng.randint(0, 2 * sum(counts) // (world * vpb) + 1)
        for k, r, _ in itertools.product(range(batches), range(world), range(vpb)):
            seen[read_reader(old[r], k % workers, pos[r][k % workers], block)] += 1
        first, left = unread([OldReader(old[r], w, pos[r][w], block) for r in range(world) for w in range(workers)])
        base = max(left) + 1 if left else first
        nworld, nworkers, nvpb = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
        for r in range(nworld):
            explicit, origin = deal(left, nworld, nworkers, r, batches * nvpb, nvpb)
            new = EpochLayout(counts, 7, nworld, nworkers, r, vpb=nvpb, gen=1, base=base, origin=origin,
                              explicit=explicit)
            clock = batches * nvpb
            for e in [*sorted(left), base]:  # worker shares follow the new batch turns
                per = [sum(len(p) for p in new.slice(w, e)) for w in range(nworkers)]
                assert per == turn_split(sum(per), nworkers, clock, nvpb)
                clock += sum(per)
            for w in range(nworkers):
                p = initial_position(w, epoch=first)
                settle(new, w, p)
                while p["epoch"] <= base:  # the re-dealt epochs and one whole epoch of the new split
                    seen[read_reader(new, w, p, block)] += 1
                    settle(new, w, p)
        for e in range(base + 1):
            assert Counter(x for (ep, x) in seen.elements() if ep == e) == everything
