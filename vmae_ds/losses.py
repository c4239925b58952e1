"""Reconstruction target and loss, exactly as VideoMAE / VideoMAE V2 define them."""

from __future__ import annotations

import torch

from .masking import TokenSelection, gather_tokens, select_tokens

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patchify(video: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, t*p*p, C): tokens in (t, h, w) order, pixels in (t, p, p) order."""
    b, c, t, h, w = video.shape
    tt, hh, ww = t // tubelet_size, h // patch_size, w // patch_size
    x = video.reshape(b, c, tt, tubelet_size, hh, patch_size, ww, patch_size)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, tt, hh, ww, t, p, p, c
    return x.reshape(b, tt * hh * ww, tubelet_size * patch_size * patch_size, c)


def channel_stats(device: torch.device | str, mean: tuple[float, ...] = IMAGENET_MEAN,
                  std: tuple[float, ...] = IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as float32 (1, C, 1, 1, 1) tensors on `device`: make them once per run, not per step
    (building a tensor from Python numbers on a GPU is a host-to-device copy every call)."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1, 1),
            torch.tensor(std, device=device).view(1, -1, 1, 1, 1))


def pixel_target(video: torch.Tensor, patch_size: int, tubelet_size: int,
                 mean: tuple[float, ...] | torch.Tensor = IMAGENET_MEAN,
                 std: tuple[float, ...] | torch.Tensor = IMAGENET_STD) -> torch.Tensor:
    """Per-patch normalised pixels (B, N, t*p*p*C), flattened channel-last.

    `video` is the normalised model input; the normalisation is undone back to [0, 1] first, then each
    token's channel is standardised over its t*p*p pixels (unbiased std + 1e-6). Computed in float32.
    `mean`/`std`: tuples, or the tensors of `channel_stats` (no per-call copy).
    """
    v = video.float()
    m = mean if isinstance(mean, torch.Tensor) else torch.tensor(mean, device=v.device).view(1, -1, 1, 1, 1)
    s = std if isinstance(std, torch.Tensor) else torch.tensor(std, device=v.device).view(1, -1, 1, 1, 1)
    patches = patchify(v * s + m, patch_size, tubelet_size)
    normed = (patches - patches.mean(dim=-2, keepdim=True)) / (patches.var(dim=-2, unbiased=True,
                                                                             keepdim=True).sqrt() + 1e-6)
    return normed.flatten(2)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, encoder_mask: torch.Tensor | TokenSelection,
                        decoder_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per token, averaged over tokens hidden from the encoder AND kept by the decoder.

    pred: (B, N_keep, D) model output; target: (B, N, D) from `pixel_target`; masks as for the model
    (bool masks, or one TokenSelection).
    """
    sel = encoder_mask if isinstance(encoder_mask, TokenSelection) else select_tokens(encoder_mask, decoder_mask)
    labels = gather_tokens(target, sel.kept)
    weight = sel.loss_weight
    per_token = (pred.float() - labels).pow(2).mean(dim=-1)
    return (per_token * weight).sum() / weight.sum()


def alignment_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """UMT: mean over aligned layers and tokens of 2 - 2 cos(student, teacher), both L2-normalised already
    (so the cosine is their dot product). Computed in float32."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student and {len(teacher)} teacher layers: one each per aligned layer")
    per_layer = [(2 - 2 * (s.float() * t.float()).sum(dim=-1)).mean() for s, t in zip(student, teacher)]
    return torch.stack(per_layer).mean()
