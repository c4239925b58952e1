"""The pretraining loader on real shards: shapes, ranks x workers, exact resume, corrupt data, backends."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import build, make_corpus, shared_dir, write_shard_with_bad_samples

from vmae_ds.data import DataConfig, build_pretrain_loader, default_mask_fn, normalize_on_device, token_grid
from vmae_ds.data.shards import ShardSpecError
from vmae_ds.data.stream import ShardReader, decode_clip, initial_position, parse_sample
from vmae_ds.data.transforms import multiscale_crop_box, train_indices

BATCH = 4  # samples per step = 2 clips x num_sample 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    corpus = make_corpus(shared_dir(tmp_path_factory, "data_corpus"))
    return build(corpus, shared_dir(tmp_path_factory, "data_shards", create=False))


def small_cfg(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), num_frames=4, sampling_rate=2, input_size=32, num_sample=2, num_workers=2)
    return DataConfig(**{**base, **kw})


def make_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 3):
    mask_fn = default_mask_fn(token_grid(cfg, patch=8))  # 2 x 4 x 4 tokens
    return build_pretrain_loader(cfg, batch_size=BATCH, rank=rank, world_size=world_size, seed=seed,
                                 mask_fn=mask_fn)


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    def eq(u, v) -> bool:
        return torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v

    return len(a) == len(b) and all(x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_two_ranks_two_workers_yield_right_shapes_and_dtypes(shards):
    cfg = small_cfg(shards)
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(cfg, rank=rank, world_size=2)
        batches = take(loader, 4)
        for b in batches:
            assert b["video"].dtype == torch.uint8 and b["video"].shape == (BATCH, 3, 4, 32, 32)
            assert b["encoder_mask"].dtype == torch.bool and b["encoder_mask"].shape == (BATCH, 32)
            assert b["decoder_mask"].dtype == torch.bool and b["decoder_mask"].shape == (BATCH, 32)
            assert (b["encoder_mask"].sum(1) == 2 * int(0.9 * 16)).all()  # tube 90 %
            assert (b["decoder_mask"].sum(1) == 16).all()  # running cell 50 %
        assert loader.stats()["decoded_clips"] >= 4 * BATCH // 2
        loader.close()
        per_rank.append(batches)
    assert not torch.equal(per_rank[0][0]["video"], per_rank[1][0]["video"])  # ranks read different data
    # repeated augmentation: consecutive samples share the clip, with their own crops and masks
    assert any(not torch.equal(b["video"][0], b["video"][1]) for b in per_rank[0])
    assert any(not torch.equal(b["encoder_mask"][0], b["encoder_mask"][1]) for b in per_rank[0])


def test_encoder_only_mode_has_no_decoder_mask(shards):
    cfg = small_cfg(shards, num_workers=0)
    loader = build_pretrain_loader(cfg, batch_size=BATCH, rank=0, world_size=1, seed=0,
                                   mask_fn=default_mask_fn(token_grid(cfg, patch=8), decoder_kind="none"))
    batch = take(loader, 1)[0]
    assert set(batch) == {"video", "keys", "encoder_mask"}


@pytest.mark.parametrize("workers", [2, 0])
def test_restored_loader_continues_bit_identically(shards, workers):
    cfg = small_cfg(shards, num_workers=workers, resampled=True)  # endless; exact epochs: test_data_sampling
    loader = make_loader(cfg, rank=1, world_size=2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    rest = [next(it) for _ in range(5)]
    loader.close()
    restored = make_loader(cfg, rank=1, world_size=2)
    restored.load_state_dict(state)
    assert same(take(restored, 5), rest)
    restored.close()
    again = make_loader(cfg, rank=1, world_size=2)  # and a fresh loader repeats the whole stream
    assert same(take(again, 8), first + rest)
    again.close()


def test_state_of_another_setup_is_refused(shards):
    state = make_loader(small_cfg(shards, num_workers=0)).state_dict()
    other = make_loader(small_cfg(shards, num_workers=0), rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)


def test_pyav_backend_gives_the_same_batches_as_decord(shards):
    cfg = small_cfg(shards, num_workers=0)
    assert same(take(make_loader(cfg), 2), take(make_loader(cfg.model_copy(update={"backend": "pyav"})), 2))


def test_corrupt_samples_are_skipped_and_counted_and_bad_shards_named(shards, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _, good, bad_keys = write_shard_with_bad_samples(sorted(shards.glob("*.tar"))[0], folder / "a.tar")
    (folder / "broken.tar").write_bytes(b"this is not a tar file" * 50)
    cfg = small_cfg(folder, num_workers=0)
    loader = make_loader(cfg)
    batches = take(loader, 8)
    assert all(b["video"].shape == (BATCH, 3, 4, 32, 32) for b in batches)
    stats = loader.stats()
    assert stats["corrupt_samples"] >= 3
    assert stats["bad_shards"].get("broken.tar", 0) >= 1
    problems = "\n".join(stats["recent_problems"])
    assert all(k in problems for k in bad_keys) and "broken.tar" in problems
    logged = [r.getMessage() for r in caplog.records if "skipped so far" in r.getMessage()]
    assert logged and "broken.tar" in logged[-1]  # the training log hears about it too


def test_exact_epochs_give_every_rank_the_same_number_of_batches(shards):
    cfg = small_cfg(shards, resampled=False)
    loaders = [make_loader(cfg, rank=r, world_size=2) for r in (0, 1)]
    expected = 16 // (2 * BATCH // 2)  # 16 clips / (2 ranks x 2 clips per batch)
    for epoch in range(2):
        for loader in loaders:
            assert len(loader) == expected and len(list(loader)) == expected
            assert loader.epoch == epoch + 1
    for loader in loaders:
        loader.close()


def test_unusable_inputs_fail_with_a_clear_message(shards, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_sample"):
        build_pretrain_loader(small_cfg(shards), batch_size=3, rank=0, world_size=1, seed=0, mask_fn=None)
    with pytest.raises(ShardSpecError, match="not found"):
        make_loader(small_cfg(tmp_path / "nope-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="extra"):
        DataConfig(shards="x", frames=16)


def test_temporal_sampling_and_source_strides(shards):
    cfg = DataConfig(shards="x")
    assert (cfg.num_frames, cfg.input_size, cfg.num_sample, cfg.stride_for("k710"), cfg.stride_for("ssv2")) == \
        (16, 224, 4, 4, 2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = train_indices(0, 100, 16, 4, gen)
        assert idx == list(range(idx[0], idx[0] + 64, 4)) and idx[-1] < 100
    assert train_indices(0, 10, 4, 4, gen) == [0, 4, 8, 9]  # too short: clamp to the last frame
    sample = next(iter(__import__("webdataset").WebDataset(str(sorted(shards.glob("*.tar"))[0]),
                                                            shardshuffle=False, empty_check=False)))
    data, meta = parse_sample(sample)
    frames = decode_clip(data, meta, small_cfg(shards), gen)
    assert frames.shape == (4, 3, 48, 64) and frames.dtype == torch.uint8


def test_multiscale_crop_sides_come_from_the_scales():
    gen = torch.Generator().manual_seed(1)
    sides = {int(240 * s) for s in (1, .875, .75, .66)} | {224}
    for _ in range(50):
        top, left, ch, cw = multiscale_crop_box(240, 320, 224, (1, .875, .75, .66), gen)
        assert ch in sides and cw in sides and top + ch <= 240 and left + cw <= 320


def test_normalize_on_device_uses_imagenet_stats():
    video = torch.full((2, 3, 4, 8, 8), 255, dtype=torch.uint8)
    out = normalize_on_device(video, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == video.shape
    expect = torch.tensor([(1 - .485) / .229, (1 - .456) / .224, (1 - .406) / .225])
    assert torch.allclose(out[0, :, 0, 0, 0].float(), expect, atol=2e-2)
    with pytest.raises(ValueError):
        normalize_on_device(video.float(), torch.float32)


def test_exact_epoch_mode_restores_across_the_epoch_boundary(shards):
    cfg = small_cfg(shards, resampled=False)
    loader = make_loader(cfg, rank=0, world_size=2)
    epoch0 = list(loader)
    it = iter(loader)
    head = [next(it) for _ in range(1)]
    state = loader.state_dict()
    tail = list(it)  # rest of epoch 1
    epoch2 = list(loader)
    loader.close()
    assert len(epoch0) == len(head) + len(tail) == len(epoch2) == 4
    restored = make_loader(cfg, rank=0, world_size=2)
    restored.load_state_dict(state)
    assert restored.epoch == 1
    assert same(list(restored), tail) and same(list(restored), epoch2)
    restored.close()


def test_shard_draws_are_shuffled_within_blocks_and_reproducible(shards):
    url = str(sorted(shards.glob("*.tar"))[0])
    reader = ShardReader([url], small_cfg(shards, shuffle_block=4), 0, 1, 1, 0, 0, None)
    keys = {seed: [s["__key__"] for s in reader.samples(url, initial_position(0), seed)] for seed in range(4)}
    plain = [s["__key__"] for s in reader.samples(url, initial_position(0))]
    assert all(sorted(k) == sorted(plain) for k in keys.values())
    assert len({tuple(k) for k in keys.values()}) > 1  # different draws, different orders
    again = [s["__key__"] for s in reader.samples(url, initial_position(0), 2)]
    assert again == keys[2]
