"""Fine-tuning augmentation for video, built on timm's image implementations.

CPU side (DataLoader workers, uint8): `FinetuneClipTransform` makes num_sample views of a decoded clip, each with
one RandAugment draw applied alike to every frame, its own random resized crop and an optional horizontal flip.
Every draw comes from the caller's torch.Generator, so a replayed batch is bit-identical.

GPU side (normalised float batch (B, C, T, H, W)): `VideoRandomErasing` and `VideoMixup`. timm's image versions
treat dims 2 and 3 as H and W; folding time into channels, (B, C*T, H, W), makes them cut the same H x W box in
every frame. Their draws use the process-global random / numpy / torch RNGs, which the checkpoint saves.
The loss for the soft targets is timm's `SoftTargetCrossEntropy`.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torchvision.transforms import RandomResizedCrop

from vmae_ds.data.transforms import crop_resize_thwc, resize_uint8

__all__ = ["AugmentError", "FinetuneClipTransform", "SoftTargetCrossEntropy", "VideoMixup", "VideoRandomErasing",
           "random_resized_crop_box"]

_PIL_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_SEED_HIGH = 2**62


class AugmentError(ValueError):
    """A bad augmentation setting or input, named in one line."""


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, _SEED_HIGH, (1,), generator=gen))


def random_resized_crop_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                            gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) exactly as torchvision's RandomResizedCrop.get_params, drawn from `gen`.

    get_params reads the global torch RNG, so it runs on a forked RNG seeded from `gen`: the caller's
    global state is untouched and the box depends only on `gen`.
    """
    seed = _seed(gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RandomResizedCrop.get_params(torch.empty(1).expand(1, h, w), list(scale), list(ratio))


class FinetuneClipTransform:
    """uint8 (T, 3, H, W) clip -> num_sample views, each uint8 (T, S, S, 3) (channels-last, for
    `stack_channels_first`). Per view, in the authors' order: RandAugment on the full frames -> random resized
    crop -> resize to S (bilinear, not antialiased) -> flip (p 0.5).

    One RandAugment draw per view, the same ops and magnitudes on every frame (timm draws ops from numpy's and
    magnitudes from python's global RNG: both are seeded from `gen` and reset before each frame, and restored
    to the caller's state afterwards); its geometric ops interpolate bicubically and translate up to 45 % of
    S (the authors' hparams). `randaug_first=False` runs it after the crop, on S x S frames (cheaper; the
    same ops, but a translation then moves 45 % of the crop rather than 45 % of S within the full frame).
    `antialias=True` antialiases the crop resize. Random draws per view, in order: RandAugment seed, crop box,
    flip. Picklable: DataLoader workers get a copy.
    """

    def __init__(self, *, input_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 randaug: str | None = "rand-m7-n4-mstd0.5-inc1", num_sample: int = 2,
                 interpolation: str = "bilinear", randaug_interpolation: str = "bicubic",
                 randaug_first: bool = True, antialias: bool = False):
        if input_size < 1:
            raise AugmentError(f"augment: input_size must be >= 1, got {input_size}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise AugmentError(f"augment: scale must be (min, max) with 0 < min <= max, got {scale}")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise AugmentError(f"augment: ratio must be (min, max) with 0 < min <= max, got {ratio}")
        if num_sample < 1:
            raise AugmentError(f"augment: num_sample must be >= 1, got {num_sample}")
        for name, value in (("interpolation", interpolation), ("randaug_interpolation", randaug_interpolation)):
            if value not in _PIL_INTERP:
                raise AugmentError(f"augment: {name} must be one of {sorted(_PIL_INTERP)}, got {value!r}")
        self.input_size, self.scale, self.ratio = input_size, tuple(scale), tuple(ratio)
        self.flip, self.randaug, self.num_sample, self.interpolation = flip, randaug, num_sample, interpolation
        self.randaug_interpolation, self.randaug_first, self.antialias = randaug_interpolation, randaug_first, antialias
        self._randaug = self._build_randaug(randaug) if randaug else None

    def _build_randaug(self, spec: str):
        # The authors' hparams: translations up to 45 % of the crop side, bicubic, grey fill.
        hparams = {"translate_const": int(self.input_size * 0.45),
                   "interpolation": _PIL_INTERP[self.randaug_interpolation]}
        if not spec.startswith("rand-"):
            raise AugmentError(f"augment: randaug {spec!r} must be a timm RandAugment string like "
                               "'rand-m7-n4-mstd0.5-inc1'")
        try:
            return rand_augment_transform(spec, hparams)
        except (AssertionError, KeyError, ValueError) as e:
            raise AugmentError(f"augment: randaug {spec!r} is not a valid timm RandAugment string "
                               f"(e.g. 'rand-m7-n4-mstd0.5-inc1'): {type(e).__name__} {e}") from None

    def __call__(self, frames: torch.Tensor, gen: torch.Generator, flip_allowed: bool) -> list[torch.Tensor]:
        """flip_allowed False for sources whose labels depend on left / right (SSv2)."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
            raise AugmentError(f"augment: expected uint8 frames (T, 3, H, W), got {frames.dtype} "
                               f"{tuple(frames.shape)}")
        return [self._view(frames, gen, flip_allowed) for _ in range(self.num_sample)]

    def _view(self, frames: torch.Tensor, gen: torch.Generator, flip_allowed: bool) -> torch.Tensor:
        seed = _seed(gen) if self._randaug is not None else None
        if seed is not None and self.randaug_first:
            frames = self._randaug_frames(frames.permute(0, 2, 3, 1), seed).permute(0, 3, 1, 2)
        h, w = frames.shape[-2:]
        box = random_resized_crop_box(h, w, self.scale, self.ratio, gen)
        x = self._crop_resize(frames, box)  # (T, S, S, 3)
        if self.flip and flip_allowed and float(torch.rand(1, generator=gen)) < 0.5:
            x = x.flip(2)
        if seed is not None and not self.randaug_first:
            x = self._randaug_frames(x, seed)
        return x

    def _crop_resize(self, frames: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        if self.interpolation == "bilinear":
            return crop_resize_thwc(frames, box, self.input_size, self.antialias)
        top, left, ch, cw = box
        x = frames[:, :, top:top + ch, left:left + cw]
        s = self.input_size
        if (ch, cw) != (s, s):
            x = resize_uint8(x, (s, s), self.antialias, mode=self.interpolation)
        return x.permute(0, 2, 3, 1)

    def _randaug_frames(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> the same, every frame through the RandAugment draw of `seed`."""
        src = np.ascontiguousarray(x.numpy())
        out = np.empty(src.shape, dtype=np.uint8)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            for t in range(src.shape[0]):
                random.seed(seed)  # the same draw for every frame of this view
                np.random.seed(seed % 2**32)
                out[t] = np.asarray(self._randaug(Image.fromarray(src[t])))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.from_numpy(out)


def _check_video(video: torch.Tensor, who: str) -> tuple[int, int, int, int, int]:
    if video.dim() != 5 or not video.is_floating_point() or video.numel() == 0:
        raise AugmentError(f"{who}: expected a normalised float video (B, C, T, H, W), got {video.dtype} "
                           f"{tuple(video.shape)}")
    return tuple(video.shape)


class VideoRandomErasing:
    """timm RandomErasing per clip, one box per clip shared by all its frames and channels.

    mode 'pixel' fills the box with per-pixel normal noise (independent per frame, as the authors' cube
    erasing), 'rand' with one normal colour per channel and frame, 'const' with 0. In place; returns the video.
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        if not 0.0 <= probability <= 1.0:
            raise AugmentError(f"random erasing: probability must be in [0, 1], got {probability}")
        if mode not in ("pixel", "rand", "const"):
            raise AugmentError(f"random erasing: mode must be pixel|rand|const, got {mode!r}")
        if max_count < 1:
            raise AugmentError(f"random erasing: max_count must be >= 1, got {max_count}")
        self.probability, self.mode, self.max_count = probability, mode, max_count
        self._erase = RandomErasing(probability=probability, mode=mode, max_count=max_count, min_area=min_area,
                                    max_area=max_area, min_aspect=min_aspect, device="cpu")

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = _check_video(video, "random erasing")
        flat = video.reshape(b, c * t, h, w)  # time folded into channels: one box covers every frame
        self._erase.device = video.device  # the noise is made where the batch is
        return self._erase(flat).view(b, c, t, h, w)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes), or one line saying which are not (-1: a clip without a label)."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise AugmentError(f"labels must be in [0, {num_classes}), got min {lo} max {hi} "
                           "(-1 is a clip whose json has no label)")


class VideoMixup:
    """timm Mixup / CutMix for (B, C, T, H, W) videos -> (mixed video, soft targets (B, num_classes)).

    Each clip is mixed with its mirror in the batch (clip i with B - 1 - i), so the batch must be even.
    CutMix cuts an H x W box through all frames (timm alone would cut along T and H of a 5-D tensor).
    With mixup_alpha and cutmix_alpha both 0 only label smoothing is applied, so the loss is always
    SoftTargetCrossEntropy. Mixes in place (like timm); returns the video.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1):
        if num_classes < 1:
            raise AugmentError(f"mixup: num_classes must be >= 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise AugmentError(f"mixup: alphas must be >= 0, got mixup_alpha={mixup_alpha} "
                               f"cutmix_alpha={cutmix_alpha}")
        if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0 and 0.0 <= label_smoothing < 1.0):
            raise AugmentError(f"mixup: prob, switch_prob in [0, 1] and label_smoothing in [0, 1) required, got "
                               f"{prob}, {switch_prob}, {label_smoothing}")
        if mode not in ("batch", "pair", "elem"):
            raise AugmentError(f"mixup: mode must be batch|pair|elem, got {mode!r}")
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixing = mixup_alpha > 0 or cutmix_alpha > 0
        self._mixup = None
        if self.mixing:
            self._mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                                mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, t, h, w = _check_video(video, "mixup")
        if labels.shape != (b,) or labels.is_floating_point():
            raise AugmentError(f"mixup: labels must be integer (B,) = ({b},), got {labels.dtype} "
                               f"{tuple(labels.shape)}")
        if not labels.is_cuda:  # on a GPU the caller checks them on the host (reading them back would sync)
            check_labels(labels, self.num_classes)
        if self._mixup is None:
            return video, mixup_target(labels, self.num_classes, 1.0, self.label_smoothing)
        if b % 2:
            raise AugmentError(f"mixup: batch size {b} is odd; mixup/cutmix pairs clip i with clip B-1-i, "
                               "so the per-GPU batch must be even")
        flat, targets = self._mixup(video.reshape(b, c * t, h, w), labels)
        return flat.view(b, c, t, h, w), targets
