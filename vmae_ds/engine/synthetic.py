"""`data.kind: synthetic`: deterministic clips generated in memory, with the loader's interface.

Useful for tests (exact resume: the state is one counter) and for benchmarking the engine without
video decoding. Clips have learnable structure (a drifting colour gradient and a moving square), so
the reconstruction loss falls when the same clips come round again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..masking import TokenGrid, make_masks

# unit steps of the moving square per label: right, left, down, up, then the diagonals
DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def synthetic_clip(seed: int, frames: int, size: int, direction: int | None = None) -> torch.Tensor:
    """One uint8 clip (3, T, H, W), a pure function of `seed`.

    `direction` (an index into DIRECTIONS) fixes where the square moves; its colour, start, speed and the
    background stay random, so only the motion tells the labelled clips apart."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(10, generator=g)
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    yy = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    f = 0.05 + 0.3 * p[:3]
    phase = t * (0.1 + 0.3 * p[3])
    img = torch.stack([torch.sin(xx * f[0] + phase).expand(frames, size, size),
                       torch.sin(yy * f[1] - phase).expand(frames, size, size),
                       torch.sin((xx + yy) * f[2] + 0.5 * phase)])
    img = 127.5 + 100.0 * img
    s = max(2, size // 4)
    colour = p[6:9] * 255
    if direction is None:
        vx, vy = (p[4:6] - 0.5) * 6
        x_start = y_start = size / 4
    else:  # a straight run that stays inside the frame: no wrap-around to confuse the direction
        dx, dy = DIRECTIONS[direction]
        speed = (size - s) / max(frames - 1, 1) * (0.5 + 0.4 * float(p[4]))
        vx, vy = dx * speed, dy * speed
        room_x, room_y = size - s - abs(vx) * (frames - 1), size - s - abs(vy) * (frames - 1)
        x_start = (0 if vx >= 0 else size - s) + (1 if vx >= 0 else -1) * float(p[5]) * room_x
        y_start = (0 if vy >= 0 else size - s) + (1 if vy >= 0 else -1) * float(p[9]) * room_y
    for i in range(frames):
        x0 = int((x_start + vx * i) % (size - s + 1))
        y0 = int((y_start + vy * i) % (size - s + 1))
        img[:, i, y0:y0 + s, x0:x0 + s] = colour.view(3, 1, 1)
    return img.clamp(0, 255).to(torch.uint8)


class SyntheticLoader:
    """Endless batches {video, encoder_mask, decoder_mask?} for one rank.

    Rank r's batch i holds pool videos ((i * world + r) * batch_videos + j) mod num_videos, each repeated
    `num_sample` times with fresh masks: the pool is walked like an epoch of a real dataset.

    `resident`: each distinct video batch (a pool offset) is stacked once and the same tensors are handed over
    again, on the accelerator when there is one, so the batch costs no host work and no copy, as if a pinned,
    decoded batch were waiting (the masks are still drawn per batch: the results do not change).
    """

    RESIDENT_BATCHES = 8  # distinct offsets kept; the engine benchmarks walk 2 (64 clips, 32 a batch)

    def __init__(self, *, num_videos: int, seed: int, frames: int, size: int, grid: TokenGrid | None,
                 batch_videos: int, num_sample: int, rank: int, world_size: int, masks: dict | None,
                 num_classes: int | None = None, resident: bool = False):
        self.num_videos, self.seed, self.frames, self.size, self.grid = num_videos, seed, frames, size, grid
        self.batch_videos, self.num_sample, self.rank, self.world = batch_videos, num_sample, rank, world_size
        self.masks, self.num_classes, self.resident = masks, num_classes, resident
        self.index = 0
        self._cache: dict[int, torch.Tensor] = {}
        self._built: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def for_run(cls, cfg: Any, rank: int, world: int, *, frames: int, size: int, grid: TokenGrid | None,
                masks: dict | None, num_classes: int | None = None) -> SyntheticLoader:
        """The loader a run config's `data.synthetic` section describes (clip shape and masks from the objective)."""
        s = cfg.data.synthetic
        return cls(num_videos=s.num_videos, seed=s.seed + cfg.seed, frames=frames, size=size, grid=grid,
                   batch_videos=cfg.optim.batch_size, num_sample=cfg.data.num_sample, rank=rank, world_size=world,
                   masks=masks, num_classes=num_classes, resident=s.resident)

    def _video(self, vid: int) -> torch.Tensor:
        if vid not in self._cache:  # the pool is small; generating costs more than keeping
            direction = None if self.num_classes is None else vid % self.num_classes
            self._cache[vid] = synthetic_clip(self.seed * 1_000_003 + vid, self.frames, self.size, direction)
        return self._cache[vid]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        first = (self.index * self.world + self.rank) * self.batch_videos
        vids = [(first + j) % self.num_videos for j in range(self.batch_videos)]
        batch = {**self._tensors(vids), "keys": [f"synthetic/{v}" for v in vids for _ in range(self.num_sample)]}
        video = batch["video"]
        if self.masks is not None:
            gen = torch.Generator().manual_seed(hash((self.seed, self.index, self.rank)) % 2**62)
            m = self.masks
            enc, dec = make_masks(m["encoder"], m["encoder_ratio"], m["decoder"], m["decoder_ratio"],
                                  video.shape[0], self.grid, generator=gen)
            batch["encoder_mask"] = enc
            if dec is not None:
                batch["decoder_mask"] = dec
        self.index += 1
        return batch

    def _tensors(self, vids: list[int]) -> dict[str, torch.Tensor]:
        key = vids[0]  # the batch's offset in the pool fixes all its videos
        if self.resident and key in self._built:
            return self._built[key]
        out = {"video": torch.stack([self._video(v) for v in vids]).repeat_interleave(self.num_sample, dim=0)}
        if self.num_classes is not None:
            out["label"] = torch.tensor([v % self.num_classes for v in vids]).repeat_interleave(self.num_sample)
        if self.resident:
            # the video only: labels stay on the host, where the objectives check them without a read-back
            out["video"] = out["video"].to(_accelerator_device())
            if len(self._built) >= self.RESIDENT_BATCHES:
                self._built.pop(next(iter(self._built)))
            self._built[key] = out
        return out

    def __len__(self) -> int:
        """Batches per epoch (for this rank)."""
        return max(1, self.num_videos // (self.batch_videos * self.world))  # floor, as the authors count

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def stats(self) -> dict:
        return {"corrupt_samples": 0, "bad_shards": {}}


def _accelerator_device() -> torch.device:
    """The device DeepSpeed's accelerator runs this thread on (the CPU under DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())
