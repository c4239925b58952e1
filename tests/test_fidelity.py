"""Our loaders, augmentation, UMT teacher input and position tables against values computed the authors' way.

Each `authors_*` function below restates, from what the authors' code does (OpenGVLab/VideoMAEv2 dataset/,
run_class_finetuning.py; OpenGVLab/unmasked_teacher single_modality/), the quantity it fixes: which frames a
clip takes, where a test view sits, what the teacher sees, how a position table is adapted. The tests compare
ours with them over many clip lengths, and check that the named option keeps our previous behaviour.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vmae_ds.data.sampling import eval_indices, eval_segment_indices, segment_indices, train_indices

LENGTHS = list(range(1, 40)) + [57, 64, 65, 100, 127, 300, 301]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ segments (TSN): VideoMAE V2 SSv2, UMT
def authors_tsn_views(n: int, t: int, clips: int) -> list[list[int]]:
    """VideoMAE V2's SSv2 test loader: every view's indices int(c tick / clips + tick x), tick = n / t, merged
    and sorted, then view c is every clips-th of them from c (UMT's SSv2 loader writes the same for 2 views)."""
    tick = n / t
    merged = sorted(int(c * tick / clips + tick * x) for c in range(clips) for x in range(t))
    return [merged[c::clips] for c in range(clips)]


def authors_tsn_train_choices(n: int, t: int) -> list[set[int]]:
    """Their training draw: segment i of floor(n / t) frames, a random frame in it; fewer frames than segments:
    the first frame repeated, then every frame."""
    seg = n // t
    if seg == 0:
        return [{i} for i in [0] * (t - n) + list(range(n))]
    return [set(range(i * seg, (i + 1) * seg)) for i in range(t)]


@pytest.mark.parametrize("t,clips", [(16, 2), (8, 2), (8, 4)])
def test_tsn_test_views_are_the_authors(t, clips):
    for n in LENGTHS:
        if n < 2 * t:
            continue  # shorter clips repeat frames: their sort interleaves ties differently, same frames
        assert eval_segment_indices(0, n, t, clips, "tsn") == authors_tsn_views(n, t, clips), n
    assert eval_segment_indices(5, 5 + 160, 16, 2, "tsn")[1][:3] == [10, 20, 30]  # 0 and 1/2 of a 10-frame segment


def test_tsn_training_draw_is_the_authors():
    g = gen(0)
    for n in LENGTHS:
        choices = authors_tsn_train_choices(n, 8)
        seen: list[set[int]] = [set() for _ in range(8)]
        for _ in range(60):
            for i, f in enumerate(segment_indices(0, n, 8, g, "tsn")):
                assert f in choices[i], (n, i, f)
                seen[i].add(f)
        assert seen == choices or n > 40, n  # every frame of a short segment drawn in 60 tries


def authors_sparse_views(n: int, t: int, clips: int) -> list[list[int]]:
    """UMT's Kinetics_sparse test loader: s = (n - 1) / t, view c: round(s i) + int(s / (clips + 1) (c + 1))."""
    s = max(0.0, (n - 1) / t)
    return [[min(int(np.round(s * i)) + int(s / (clips + 1) * (c + 1)), n - 1) for i in range(t)]
            for c in range(clips)]


def test_sparse_style_is_umts_kinetics_loader():
    g = gen(1)
    for n in LENGTHS:
        assert eval_segment_indices(0, n, 8, 4, "sparse") == authors_sparse_views(n, 8, 4), n
        s = max(0.0, (n - 1) / 8)
        bounds = [(int(np.round(s * i)), min(int(np.round(s * (i + 1))), n - 1)) for i in range(8)]
        for _ in range(20):  # training: random.randint(start, end), both ends included
            assert all(lo <= f <= hi for f, (lo, hi) in zip(segment_indices(0, n, 8, g, "sparse"), bounds)), n


def test_even_style_keeps_our_previous_views():
    assert eval_segment_indices(0, 80, 8, 2, "even") == [[2, 12, 22, 32, 42, 52, 62, 72],
                                                         [7, 17, 27, 37, 47, 57, 67, 77]]


# ------------------------------------------------------------------ stride: VideoMAE V2 Kinetics fine-tuning
def authors_linspace_choices(n: int, t: int, rate: int) -> list[list[int]]:
    """VideoMAE V2's fine-tuning draw (num_segment 1): a window of t x rate frames ending at a random end in
    [t rate, n), t points of linspace(start, end) truncated, clipped to end - 1; a shorter clip: linspace(0, n)
    with n // rate points, then the last frame."""
    win = t * rate
    if n <= win:
        idx = list(np.linspace(0, n, num=n // rate)) + [n] * (t - n // rate)
        return [[int(min(max(i, 0), n - 1)) for i in idx]]
    return [[int(min(i, end - 1)) for i in np.linspace(end - win, end, num=t)] for end in range(win, n)]


def test_linspace_spacing_is_the_authors_fine_tuning_draw():
    g = gen(2)
    for n in [3, 10, 40, 63, 64, 65, 66, 100, 300]:
        choices = authors_linspace_choices(n, 16, 4)
        got = [train_indices(0, n, 16, 4, g, "linspace") for _ in range(40)]
        assert all(c in choices for c in got), n
        assert len(choices) == 1 or len({tuple(c) for c in got}) > 1, n  # a random window where there is room
    assert train_indices(0, 300, 16, 4, gen(3), "exact")[1] - train_indices(0, 300, 16, 4, gen(3), "exact")[0] == 4


def authors_stride_views(n: int, t: int, rate: int, clips: int) -> list[list[int]]:
    """VideoMAE V2's test loader: frames 0, rate, 2 rate, ... (the last repeated up to t), view c starts at
    int(c x (count - t) / (clips - 1)) on that grid."""
    grid = list(range(0, n, rate))
    grid += [grid[-1]] * (t - len(grid)) if len(grid) < t else []
    step = max((len(grid) - t) / (clips - 1), 0)
    return [grid[int(c * step):int(c * step) + t] for c in range(clips)]


def test_stride_test_views_are_the_authors():
    for n in LENGTHS:
        assert eval_indices(0, n, 16, 4, 5, "authors") == authors_stride_views(n, 16, 4, 5), n
    even = eval_indices(0, 300, 16, 4, 5, "even")
    assert even[-1][-1] == 299 and even != eval_indices(0, 300, 16, 4, 5, "authors")  # the option: ours


def test_test_crops_are_the_authors():
    """Their test resize: short side -> S, long side int(S x long / short); crop k of n at
    int(k x (long - S) / (n - 1)) along the long side."""
    from vmae_ds.data.transforms import resize_short_side, spatial_views

    frames = torch.arange(50, dtype=torch.uint8).view(1, 1, 1, 50).expand(2, 3, 32, 50).contiguous()
    views = spatial_views(frames, 32, 3, antialias=False)
    assert [int(v[0, 0, 0, 0]) for v in views] == [0, 9, 18]  # columns: int(k x 18 / 2)
    assert resize_short_side(torch.zeros(1, 3, 40, 71, dtype=torch.uint8), 32).shape[-2:] == (32, 56)  # 56.8


def test_resize_without_antialias_is_the_authors_float_resize():
    """Their fine-tuning crop resizes normalised floats with F.interpolate (bilinear, no antialiasing): ours, in
    uint8, is that value rounded (half a level at most)."""
    from vmae_ds.data.transforms import crop_resize_thwc

    frames = torch.randint(0, 256, (4, 3, 60, 90), dtype=torch.uint8, generator=gen(4))
    box = (5, 7, 50, 70)
    ours = crop_resize_thwc(frames, box, 32, antialias=False).permute(0, 3, 1, 2).float()
    theirs = F.interpolate(frames[:, :, 5:55, 7:77].float(), size=(32, 32), mode="bilinear", align_corners=False)
    assert (ours - theirs).abs().max() <= 0.5 + 1e-4
    smooth = crop_resize_thwc(frames, box, 32, antialias=True).permute(0, 3, 1, 2).float()
    assert (smooth - theirs).abs().max() > 10  # the option (antialiased) is a different filter


# ------------------------------------------------------------------ RandAugment before the crop, bicubic
def test_finetune_views_follow_the_authors_order():
    """Their _aug_frame: RandAugment (one draw for every frame, bicubic, translate 45 % of 224 -> here of S) on
    the full frames, then the random resized crop resized bilinearly without antialiasing, then the flip."""
    from timm.data.auto_augment import rand_augment_transform

    from vmae_ds.data.augment import FinetuneClipTransform, _seed, random_resized_crop_box

    spec, size = "rand-m9-n4-mstd0.5-inc1", 32
    frames = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8, generator=gen(5))
    frames[:, :, 10:30, 20:40] = 255  # an edge that rotation / translation must move
    tf = FinetuneClipTransform(input_size=size, randaug=spec, num_sample=6)
    g = gen(6)
    views = tf(frames, g, flip_allowed=True)
    replay, ra = gen(6), rand_augment_transform(spec, {"translate_const": int(size * 0.45),
                                                       "interpolation": Image.Resampling.BICUBIC})
    for v in views:
        seed = _seed(replay)
        augmented = []
        for f in frames.permute(0, 2, 3, 1).numpy():
            random.seed(seed)
            np.random.seed(seed % 2**32)
            augmented.append(torch.from_numpy(np.array(ra(Image.fromarray(f)))))
        full = torch.stack(augmented).permute(0, 3, 1, 2).float()
        top, left, h, w = random_resized_crop_box(48, 64, (0.08, 1.0), (3 / 4, 4 / 3), replay)
        want = F.interpolate(full[:, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                             align_corners=False)
        if float(torch.rand(1, generator=replay)) < 0.5:
            want = want.flip(-1)
        assert (v.permute(0, 3, 1, 2).float() - want).abs().max() <= 0.5 + 1e-4
    for option in ({"randaug_first": False}, {"randaug_interpolation": "bilinear"}):  # each is a visible change
        other = FinetuneClipTransform(input_size=size, randaug=spec, num_sample=6, **option)
        assert any(not torch.equal(a, b) for a, b in zip(other(frames, gen(6), True), views)), option


# ------------------------------------------------------------------ UMT: teacher input, flip
@pytest.fixture(scope="module")
def umt_objective(tmp_path_factory):
    from vmae_ds.engine.run_config import RunConfig
    from vmae_ds.models.clip_teacher import random_openai_state_dict, save_openai_state_dict
    from vmae_ds.objectives.umt import UMTObjective

    clip = save_openai_state_dict(random_openai_state_dict("clip_tiny_debug", seed=3),
                                  tmp_path_factory.mktemp("clip") / "clip.pt")
    # a /16 student at 64 px: a 4 x 4 grid, which the /8 teacher sees at 32 px (resized, as UMT-L's 224 -> 196)
    cfg = RunConfig.model_validate({"objective": "umt", "precision": "fp32",
                                    "model": {"name": "vit_tiny_debug", "num_frames": 4, "tubelet_size": 1,
                                              "patch_size": 16, "img_size": 64},
                                    "umt": {"teacher": {"name": "clip_tiny_debug", "path": str(clip)},
                                            "align_layers": 2}})
    obj = UMTObjective(cfg)
    obj.setup(torch.device("cpu"))
    return obj


def test_umt_teacher_sees_the_students_frames_resized_bicubically(umt_objective):
    obj = umt_objective
    video = torch.randn(2, 3, 4, 64, 64, generator=gen(7))
    feats, attn = obj.teacher_targets(video)
    b, c, t, h, w = video.shape
    # theirs: F.interpolate(videos.view(B, C*T, H, W), 196 px, bicubic) of the ImageNet-normalised clip, as is
    frames = F.interpolate(video.view(b, c * t, h, w), size=(32, 32), mode="bicubic", align_corners=False)
    frames = frames.view(b, c, t, 32, 32).transpose(1, 2).reshape(b * t, c, 32, 32)
    want, want_attn = obj.teacher(frames)
    assert torch.allclose(feats[0], want[0].reshape(b, t * 16, -1), atol=1e-5)
    assert torch.allclose(attn, want_attn.reshape(b, t, 16), atol=1e-6)
    obj.uc = obj.uc.model_copy(update={"teacher_normalize": "clip", "teacher_resize": "bilinear"})
    try:  # the options: CLIP's statistics, bilinear
        other, _ = obj.teacher_targets(video)
    finally:
        obj.uc = obj.uc.model_copy(update={"teacher_normalize": "student", "teacher_resize": "bicubic"})
    assert not torch.allclose(other[0], feats[0], atol=1e-3)


def test_umt_pretraining_crops_are_flipped_like_the_authors():
    """Their GroupRandomHorizontalFlip after the multi-scale crop: the whole clip, p 0.5; VideoMAE: never."""
    from vmae_ds.data import DataConfig, MultiScaleCrops
    from vmae_ds.data.transforms import crop_resize_thwc, multiscale_crop_box

    cfg = DataConfig(shards="x", num_frames=2, input_size=32, num_sample=1)
    frames = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8, generator=gen(8))
    flipped = 0
    for seed in range(40):
        got = MultiScaleCrops(cfg, flip=True)(frames, gen(seed), {})[0]
        replay = gen(seed)
        crop = crop_resize_thwc(frames, multiscale_crop_box(48, 64, 32, cfg.scales, replay), 32)
        flip = float(torch.rand(1, generator=replay)) < 0.5
        assert torch.equal(got, crop.flip(2) if flip else crop)
        flipped += flip
        assert torch.equal(MultiScaleCrops(cfg)(frames, gen(seed), {})[0], crop)  # no flip, no extra draw
    assert 10 < flipped < 30


# ------------------------------------------------------------------ position tables at other sizes
def authors_sinusoid(n: int, d: int) -> np.ndarray:
    """The authors' table: position / 10000^(2 (j // 2) / d), sin on even dims, cos on odd ones."""
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2], table[:, 1::2] = np.sin(table[:, 0::2]), np.cos(table[:, 1::2])
    return table


def authors_adapted_table(source: tuple[int, int, int], grid: tuple[int, int, int], d: int) -> torch.Tensor:
    """UMT's fine-tuning table: the pretraining grid's table (8 x 14 x 14 for 224 px, 8 frames, tubelet 1)
    resampled bicubically in space (align_corners False), then linearly in time, to the new grid."""
    t0, p0, _ = source
    t, p, _ = grid
    x = torch.tensor(authors_sinusoid(t0 * p0 * p0, d), dtype=torch.float).reshape(t0, p0, p0, d)
    if p != p0:
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(p, p), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)
    if t != t0:
        x = F.interpolate(x.permute(1, 2, 3, 0).reshape(-1, d, t0), size=t, mode="linear")
        x = x.reshape(p, p, d, t).permute(3, 0, 1, 2)
    return x.reshape(1, -1, d)


@pytest.mark.parametrize("grid", [(16, 14, 14), (8, 16, 16), (4, 12, 12), (8, 14, 14)])
def test_position_table_at_another_grid_is_the_authors(grid):
    from vmae_ds.models.pos_embed import interpolated_table

    want = authors_adapted_table((8, 14, 14), grid, 96)
    assert torch.allclose(interpolated_table((8, 14, 14), grid, 96), want, atol=1e-6)


def test_classifier_interpolates_the_initial_weights_table(tmp_path):
    """finetune.init trained at the registry grid (4 frames of 32 px: 2 x 4 x 4), fine-tuned at 8 frames: the
    model's table is that grid's, resampled; pos_embed=fresh keeps the new grid's own sinusoid."""
    from safetensors.torch import save_file

    from vmae_ds.engine.run_config import RunConfig
    from vmae_ds.models import create_classifier
    from vmae_ds.models.pos_embed import sinusoid_table
    from vmae_ds.objectives.classify import ClassifyObjective

    init = tmp_path / "init.safetensors"
    save_file(create_classifier("vit_tiny_debug", 4).state_dict(), str(init))
    base = {"objective": "classify", "model": {"name": "vit_tiny_debug", "num_frames": 8}}
    for mode, fresh_head in (("interpolate", True), ("interpolate", False), ("fresh", False)):
        cfg = RunConfig.model_validate({**base, "finetune": {"num_classes": 4, "init": str(init), "pos_embed": mode,
                                                             "init_fresh_head": fresh_head}})
        obj = ClassifyObjective(cfg)
        model = obj.build_model()
        lines = obj.initial_weights(model)  # a fresh head rebuilds the table: it must come back
        want = authors_adapted_table((2, 4, 4), (4, 4, 4), 48) if mode == "interpolate" else sinusoid_table(64, 48)
        assert torch.allclose(model.pos_embed, want, atol=1e-6), mode
        assert (obj.state_dict().get("pos_embed") is not None) == (mode == "interpolate")
        assert any("interpolated from the initial weights' grid (2, 4, 4)" in line for line in lines) == \
            (mode == "interpolate"), lines


# ------------------------------------------------------------------ evaluation keeps the training clips
def test_eval_config_keeps_every_field_that_defines_a_clip():
    from vmae_ds.data import DataConfig
    from vmae_ds.objectives.classify import CLIP_FIELDS, READ_FIELDS, eval_data_config

    trained = DataConfig(shards="train", sampling="segments", segment_style="sparse", sampling_rate=3,
                         source_sampling_rate={"ssv2": 1}, stride_views="even", antialias=True, backend="pyav",
                         num_frames=8, read_retries=7, cache_gib=3.0)
    ev = eval_data_config(trained.model_dump(), "val", 1, 8, 224)
    assert {k: getattr(ev, k) for k in CLIP_FIELDS} == {k: getattr(trained, k) for k in CLIP_FIELDS}
    # evaluation shards are read the way the training shards were (same store, retries, cache)
    assert {k: getattr(ev, k) for k in READ_FIELDS} == {k: getattr(trained, k) for k in READ_FIELDS}
    # every DataConfig field is either carried or named as training / loader only: a new one must be sorted
    loader_only = {"shards", "num_frames", "input_size", "scales", "num_sample", "num_workers", "resampled",
                   "shuffle_block", "pin_memory", "persistent_workers", "prefetch_factor", "max_inflight_gib",
                   "shm_path", "decode_timeout_s", "max_bad_shards_in_a_row", "max_corrupt_in_a_row", "frame_spacing",
                   "base_url"}
    carried = set(CLIP_FIELDS) | set(READ_FIELDS)
    assert set(DataConfig.model_fields) == carried | loader_only, set(DataConfig.model_fields) ^ (
        carried | loader_only)
    default = eval_data_config({}, "val", 1, 8, 224)
    assert default.sampling == "stride" and not default.antialias  # weights files: the authors' test views


def test_segments_trained_run_is_evaluated_with_segments(tmp_path_factory):
    """The end-of-training evaluation (ClassifyObjective.eval_loader) uses the run's sampling, not dense
    stride-4 clips (vmae-eval on a run folder: tests/test_ema.py)."""
    from data_helpers import build, make_corpus, shared_dir

    from vmae_ds.engine.run_config import load_run_config
    from vmae_ds.objectives.classify import ClassifyObjective, describe_clips

    corpus = make_corpus(shared_dir(tmp_path_factory, "data_corpus"))
    shards = build(corpus, shared_dir(tmp_path_factory, "data_shards", create=False))
    cfg = load_run_config(None, ["objective=classify", "finetune.num_classes=4", f"finetune.eval.shards={shards}",
                                 "model.name=vit_tiny_debug", "model.num_frames=8", "data.kind=shards",
                                 f"data.shards.shards={shards}", "data.shards.sampling=segments",
                                 "data.shards.segment_style=tsn"])
    loader = ClassifyObjective(cfg).eval_loader(0, 1)
    assert loader.cfg.sampling == "segments" and loader.cfg.segment_style == "tsn"
    assert describe_clips(loader.cfg).startswith("8 frames, segments (tsn)")
    batch = next(iter(loader))
    assert batch["video"].shape[1:3] == (5 * 3, 3) and bool(batch["valid"].all())
    assert math.isfinite(float(batch["video"].float().mean()))
