"""Fine-tuning augmentation: per-view crops / flip / video RandAugment (CPU, uint8), random erasing and
mixup / cutmix on normalised 5-D videos."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch

from vmae_ds.data.augment import (
    AugmentError,
    FinetuneClipTransform,
    SoftTargetCrossEntropy,
    VideoMixup,
    VideoRandomErasing,
    random_resized_crop_box,
)
from vmae_ds.data.transforms import stack_channels_first


@pytest.fixture
def global_rngs():
    """Seed the process-global RNGs the timm device-side ops draw from; put the caller's state back after."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def still_clip(t: int = 4, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    """T identical frames of a textured image (so every RandAugment op visibly changes it)."""
    g = gen(seed)
    base = torch.randint(0, 256, (3, h // 4, w // 4), dtype=torch.uint8, generator=g)
    frame = torch.nn.functional.interpolate(base[None].float(), size=(h, w), mode="bilinear")[0]
    ramp = torch.linspace(0, 60, w).expand(h, w)
    return (frame * 0.7 + ramp).clamp(0, 255).to(torch.uint8).expand(t, 3, h, w).contiguous()


# ------------------------------------------------------------------ CPU: FinetuneClipTransform


def test_views_shape_dtype_and_batching():
    tf = FinetuneClipTransform(input_size=32, num_sample=2)
    views = tf(still_clip(), gen(0), flip_allowed=True)
    assert len(views) == 2
    assert all(v.shape == (4, 32, 32, 3) and v.dtype == torch.uint8 for v in views)
    assert stack_channels_first(views).shape == (2, 3, 4, 32, 32)


def test_randaug_is_one_draw_per_view_applied_to_every_frame():
    clip = still_clip(t=6)
    with_ra = FinetuneClipTransform(input_size=32, num_sample=4)
    without = FinetuneClipTransform(input_size=32, num_sample=4, randaug=None)
    changed = 0
    for seed in range(5):
        views = with_ra(clip, gen(seed), flip_allowed=True)
        for v in views:  # identical input frames -> identical output frames iff one draw per view
            assert torch.equal(v, v[:1].expand_as(v)), f"seed {seed}: frames of a view differ"
        # view 0 has the same crop and flip with and without RandAugment (those draws come first)
        changed += not torch.equal(views[0], without(clip, gen(seed), flip_allowed=True)[0])
    assert changed >= 3  # RandAugment really ran (all 4 ops skipped has probability 1/16 per view)


def test_same_seed_same_views_different_seeds_and_views_differ_global_state_untouched():
    tf = FinetuneClipTransform(input_size=32, num_sample=3)
    clip = still_clip()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a = tf(clip, gen(7), flip_allowed=True)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    random.seed(999)  # other global states must not matter: everything comes from the generator
    np.random.seed(999)
    b = tf(clip, gen(7), flip_allowed=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = tf(clip, gen(8), flip_allowed=True)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    clone = pickle.loads(pickle.dumps(tf))  # DataLoader workers get a pickled copy
    assert all(torch.equal(x, y) for x, y in zip(a, clone(clip, gen(7), flip_allowed=True)))


def test_random_resized_crop_box_statistics():
    h, w = 256, 256  # square: tall and wide boxes are rejected alike, so the log ratio is centred on 0
    boxes = [random_resized_crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen(s)) for s in range(1500)]
    area = np.array([ch * cw / (h * w) for _, _, ch, cw in boxes])
    log_ratio = np.array([math.log(cw / ch) for _, _, ch, cw in boxes])
    for top, left, ch, cw in boxes:
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    # rounding to whole pixels moves area and ratio a little past the nominal ranges
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert area.min() < 0.1 and area.max() > 0.9  # the whole range is used
    assert 0.35 < area.mean() < 0.6  # uniform 0.08..1 (mean 0.54), large draws rejected more often
    assert np.abs(log_ratio).max() <= math.log(4 / 3) + 0.02
    assert abs(log_ratio.mean()) < 0.03 and log_ratio.min() < -0.25 and log_ratio.max() > 0.25
    assert random_resized_crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen(3)) == boxes[3]


def test_flip_only_when_enabled_and_allowed():
    # a 32 x 32 clip cropped whole (scale 1, ratio 1) at size 32: the view is the clip, or its mirror
    clip = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    plain = clip.permute(0, 2, 3, 1)
    mirror = plain.flip(2)

    def flips(tf, allowed):
        n = 0
        for s in range(60):
            for v in tf(clip, gen(s), flip_allowed=allowed):
                assert torch.equal(v, plain) or torch.equal(v, mirror)
                n += torch.equal(v, mirror)
        return n

    kw = dict(input_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), randaug=None, num_sample=2)
    assert 35 < flips(FinetuneClipTransform(flip=True, **kw), True) < 85  # p 0.5 over 120 views
    assert flips(FinetuneClipTransform(flip=True, **kw), False) == 0  # SSv2-like source
    assert flips(FinetuneClipTransform(flip=False, **kw), True) == 0


def test_bad_settings_and_inputs_are_one_line_errors():
    with pytest.raises(AugmentError, match="randaug 'auto-m7'"):
        FinetuneClipTransform(randaug="auto-m7")
    with pytest.raises(AugmentError, match="randaug 'rand-m7-x3'"):
        FinetuneClipTransform(randaug="rand-m7-x3")
    with pytest.raises(AugmentError, match="interpolation"):
        FinetuneClipTransform(interpolation="nearest")
    with pytest.raises(AugmentError, match="scale"):
        FinetuneClipTransform(scale=(0.5, 0.1))
    with pytest.raises(AugmentError, match=r"uint8 frames \(T, 3, H, W\)"):
        FinetuneClipTransform()(still_clip().float(), gen(0), flip_allowed=True)


# ------------------------------------------------------------------ device side: erasing


def box_of(mask2d: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) if mask2d is exactly one filled rectangle, None if empty; fails otherwise."""
    rows, cols = mask2d.any(1).nonzero().flatten(), mask2d.any(0).nonzero().flatten()
    if len(rows) == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    expect = torch.zeros_like(mask2d)
    expect[top:bottom, left:right] = True
    assert torch.equal(mask2d, expect), "changed pixels are not one rectangle"
    return top, bottom, left, right


def test_random_erasing_one_box_per_clip_shared_by_frames(global_rngs):
    b, c, t, h, w = 400, 3, 4, 20, 24
    video = torch.zeros(b, c, t, h, w)
    out = VideoRandomErasing()(video)
    erased = out != 0  # 'pixel' mode fills with normal noise, never exactly 0 in practice
    boxes = []
    for i in range(b):
        m = erased[i]
        assert torch.equal(m, m[:1, :1].expand_as(m)), f"clip {i}: frames/channels erased differently"
        box = box_of(m[0, 0])
        if box is not None:
            boxes.append(box)
            frac = (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
            assert 0.01 <= frac <= 0.40  # timm: 2 % .. 1/3 of the area, rounded to whole pixels
    assert 0.18 < len(boxes) / b < 0.32  # probability 0.25 (3 sigma ~ 0.065)
    assert len(set(boxes)) > len(boxes) // 2  # independent draws per clip
    assert not torch.equal(out[erased.nonzero()[0][0], 0, 0], out[erased.nonzero()[0][0], 0, 1])  # noise per frame


# ------------------------------------------------------------------ device side: mixup / cutmix


def smooth_onehot(y: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, k).float() * (1 - eps) + eps / k


def test_cutmix_cuts_the_same_hw_box_in_every_frame_and_lam_is_its_area(global_rngs):
    b, c, t, h, w, k = 4, 3, 5, 12, 16, 7
    y = torch.tensor([0, 3, 5, 6])
    mix = VideoMixup(k, mixup_alpha=0.0, cutmix_alpha=1.0)
    seen = 0
    for _ in range(12):
        orig = torch.randn(b, c, t, h, w)
        mixed, target = mix(orig.clone(), y)
        changed = mixed != orig
        box = box_of(changed[0, 0, 0])
        lam = 1.0
        if box is not None:
            seen += 1
            top, bottom, left, right = box
            lam = 1 - (bottom - top) * (right - left) / (h * w)
            for i in range(b):  # same box for every clip (batch mode), channel and frame: time is never cut
                assert torch.equal(changed[i], changed[0, :1, :1].expand(c, t, h, w))
                j = b - 1 - i
                assert torch.equal(mixed[i, :, :, top:bottom, left:right], orig[j, :, :, top:bottom, left:right])
        expect = lam * smooth_onehot(y, k, 0.1) + (1 - lam) * smooth_onehot(y.flip(0), k, 0.1)
        torch.testing.assert_close(target, expect)
        torch.testing.assert_close(target.sum(1), torch.ones(b))
    assert seen >= 8  # the boxes were really cut (empty only when clipping leaves nothing)


def test_mixup_blends_mirror_clips_and_targets_match_lam(global_rngs):
    b, k = 4, 5
    y = torch.tensor([0, 1, 2, 3])
    orig = torch.randn(b, 3, 2, 8, 8)
    mixed, target = VideoMixup(k, mixup_alpha=0.8, cutmix_alpha=0.0)(orig.clone(), y)
    lam = (target[0, 0].item() - 0.1 / k) / 0.9  # class 0 only from clip 0 (clip 3 has class 3)
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * orig + (1 - lam) * orig.flip(0))
    expect = lam * smooth_onehot(y, k, 0.1) + (1 - lam) * smooth_onehot(y.flip(0), k, 0.1)
    torch.testing.assert_close(target, expect)
    torch.testing.assert_close(target.sum(1), torch.ones(b))


def test_default_recipe_targets_and_loss(global_rngs):
    mix = VideoMixup(10)  # mixup 0.8 + cutmix 1.0, switch 0.5, smoothing 0.1
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    for _ in range(6):
        video, target = mix(torch.randn(6, 3, 4, 16, 16), y)
        torch.testing.assert_close(target.sum(1), torch.ones(6))
        loss = SoftTargetCrossEntropy()(torch.zeros(6, 10), target)
        assert loss.item() == pytest.approx(math.log(10), rel=1e-5)  # uniform logits: -log(1/10)


def test_no_mixing_is_label_smoothing_only_and_any_batch():
    video = torch.randn(3, 3, 2, 8, 8)
    out, target = VideoMixup(4, mixup_alpha=0.0, cutmix_alpha=0.0)(video.clone(), torch.tensor([0, 3, 1]))
    assert torch.equal(out, video)
    torch.testing.assert_close(target, smooth_onehot(torch.tensor([0, 3, 1]), 4, 0.1))


def test_mixup_errors():
    mix = VideoMixup(5)
    with pytest.raises(AugmentError, match="batch size 3 is odd"):
        mix(torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(AugmentError, match=r"labels must be in \[0, 5\), got min -1"):
        mix(torch.randn(2, 3, 2, 8, 8), torch.tensor([-1, 1]))
    with pytest.raises(AugmentError, match=r"\(B, C, T, H, W\)"):
        mix(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(AugmentError, match="mode"):
        VideoMixup(5, mode="frames")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_side_ops_on_cuda(global_rngs):
    video = torch.zeros(64, 3, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    out = VideoRandomErasing(probability=1.0)(video)
    assert out.device.type == "cuda" and (out != 0).any()
    erased = (out != 0)
    assert torch.equal(erased, erased[:, :1, :1].expand_as(erased))
    mixed, target = VideoMixup(10)(torch.randn(4, 3, 4, 16, 16, device="cuda"), torch.arange(4, device="cuda"))
    assert mixed.device.type == "cuda" and target.device.type == "cuda"
