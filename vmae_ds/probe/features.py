"""Frozen features of labelled clips for the probes: one pass of an EvalLoader on every rank, each rank its
share of the videos (so a ZeRO-3 forward's collectives line up), then merged in video-index order.

The pooled feature is LayerNorm(mean over tokens of the last block's output), without affine: for an exported
pretraining checkpoint that is exactly what a classifier built from it computes before its head (fc_norm
starts at weight 1, bias 0), so the in-run probe and `vmae-probe` on the exported weights see the same vector.
Unreadable clips (a damaged shard, a bad video) and clips without an integer label are left out and named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..data.transforms import normalize_on_device, pixel_stats

Forward = Callable[[Tensor], tuple[Tensor, Tensor]]  # normalised video -> (pooled (B, D), tokens (B, N, D))


@dataclass
class FeatureSet:
    """Features of the readable, labelled clips of one split, ordered by video index."""

    index: Tensor  # (n,) int64: position in the whole shard set
    labels: Tensor  # (n,) int64
    pooled: Tensor  # (n, D) float32
    tokens: Tensor | None = None  # (n, N, D) float16, when the attentive probe needs them
    keys: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # keys of clips that could not be read
    skipped_index: list[int] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.index.numel())

    @staticmethod
    def merge(parts: list[FeatureSet]) -> FeatureSet:
        index = torch.cat([p.index for p in parts])
        order = index.argsort()
        keys = [k for p in parts for k in p.keys]
        tokens = None
        if all(p.tokens is not None for p in parts) and parts:
            tokens = torch.cat([p.tokens for p in parts])[order]
        skipped = sorted((i, k) for p in parts for i, k in zip(p.skipped_index, p.skipped))
        return FeatureSet(index=index[order], labels=torch.cat([p.labels for p in parts])[order],
                          pooled=torch.cat([p.pooled for p in parts])[order], tokens=tokens,
                          keys=[keys[i] for i in order.tolist()], skipped=[k for _, k in skipped],
                          skipped_index=[i for i, _ in skipped],
                          unlabelled=sorted(k for p in parts for k in p.unlabelled))

    def damaged_shards(self) -> list[str]:
        """Shards with at least one unreadable clip (keys are '<shard>/<sample key>')."""
        return sorted({k.split("/", 1)[0] for k in self.skipped})

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.__dict__, tmp)
        tmp.replace(path)  # the file appears whole or not at all: its presence means this rank is done

    @staticmethod
    def load(path: Path) -> FeatureSet:
        return FeatureSet(**torch.load(path, weights_only=True))


def encoder_features(encoder: Any, video: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled (B, D) float32, tokens (B, N, D)) of a VideoEncoder with its final norm (pretraining, UMT):
    the last block's output before that norm, as a classifier built from the weights sees it."""
    _, inter = encoder.forward_features(video, None, keep_last=1)
    x = inter[-1]
    return F.layer_norm(x.mean(dim=1).float(), (x.shape[-1],), eps=1e-6), x


def classifier_features(model: Any, video: Tensor) -> tuple[Tensor, Tensor]:
    """The same for a VideoClassifier (no final norm; fc_norm before the head)."""
    tokens = model.forward_features(video)[0]
    return model.fc_norm(tokens.mean(dim=1)).float(), tokens


@torch.no_grad()
def extract(forward: Forward, loader: Any, device: torch.device, dtype: torch.dtype, *, tokens: bool = False,
            progress: Callable[[int], None] | None = None) -> FeatureSet:
    """This rank's features over one pass of `loader` (an EvalLoader with 1 clip x 1 crop)."""
    stats = pixel_stats(device)
    index, labels, pooled, toks, keys = [], [], [], [], []
    skipped, skipped_index, unlabelled = [], [], []
    dim = 0
    for batch in loader:
        video = batch["video"]
        if video.shape[1] != 1:
            raise ValueError(f"probe features take one view per video, the loader gives {video.shape[1]}")
        p, t = forward(normalize_on_device(video[:, 0].to(device, non_blocking=True), dtype, stats))
        dim = p.shape[1]
        for j, key in enumerate(batch["keys"]):
            i, lab = int(batch["index"][j]), int(batch["label"][j])
            if i < 0:  # padding: every rank runs the same number of batches
                continue
            if not bool(batch["valid"][j]):
                skipped.append(key)
                skipped_index.append(i)
            elif lab < 0:
                unlabelled.append(key)
            else:
                index.append(i)
                labels.append(lab)
                keys.append(key)
                pooled.append(p[j].float().cpu())
                if tokens:
                    toks.append(t[j].to(torch.float16).cpu())
        if progress is not None:
            progress(1)
    return FeatureSet(index=torch.tensor(index, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                      pooled=torch.stack(pooled) if pooled else torch.zeros(0, dim),
                      tokens=(torch.stack(toks) if toks else None) if tokens else None, keys=keys, skipped=skipped,
                      skipped_index=skipped_index, unlabelled=unlabelled)


def gather(mine: FeatureSet, world: int, group: Any = None) -> FeatureSet:
    """Every rank's pooled features, merged on every rank (tokens are not sent: they stay in files)."""
    if world == 1:
        return mine
    light = FeatureSet(**{**mine.__dict__, "tokens": None})
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, light, group=group)
    return FeatureSet.merge(parts)
