"""`PretrainLoader`: the rank's view of the stream, with exact save/restore and per-batch masks.

Batches come from the workers in a fixed round-robin (the DataLoader's in-order mode), so batch k of
a rank is local batch k // W of logical worker k % W. After a restore at k, DataLoader worker i plays
logical worker (i + k) % W, so the first batch again comes from the right worker.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from vmae_ds.data.config import DataConfig
from vmae_ds.data.shards import resolve_shards
from vmae_ds.data.stream import ClipStream, derive_seed, initial_position, log
from vmae_ds.masking import TokenGrid, make_masks

MaskFn = Callable[[int, torch.Generator], "tuple[torch.Tensor, torch.Tensor | None]"]


def default_mask_fn(grid: TokenGrid, encoder_kind: str = "tube", encoder_ratio: float = 0.9,
                    decoder_kind: str = "running_cell", decoder_ratio: float = 0.5) -> MaskFn:
    """The paper's masks: tube 90 % for the encoder, running cell 50 % for the decoder."""

    def mask_fn(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return make_masks(encoder_kind, encoder_ratio, decoder_kind, decoder_ratio, batch_size, grid, generator)

    return mask_fn


def token_grid(cfg: DataConfig, patch: int = 16, tubelet: int = 2) -> TokenGrid:
    """The model's token grid for this data config (16 frames, 224, p16 -> 8 x 14 x 14)."""
    return TokenGrid(cfg.num_frames // tubelet, cfg.input_size // patch, cfg.input_size // patch)


class PretrainLoader:
    """Iterable of batches {video uint8 (B, 3, T, S, S), encoder_mask (B, N), decoder_mask (B, N)}.

    `batch_size` counts samples after repeated augmentation: each decoded clip gives `num_sample` of
    them, so batch_size / num_sample clips are decoded per step. Resampled mode iterates forever;
    exact-epoch mode yields `len(loader)` batches per `iter()` (one epoch, the same count on every rank).
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 mask_fn: MaskFn | None, labels: bool = False):
        if batch_size < cfg.num_sample or batch_size % cfg.num_sample:
            raise ValueError(f"batch_size {batch_size} must be a multiple of num_sample {cfg.num_sample} "
                             "(it counts samples after repeated augmentation)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.mask_fn, self.labels = mask_fn, labels
        self.urls, counts = resolve_shards(cfg.shards)
        self.workers = max(cfg.num_workers, 1)
        self.videos_per_batch = batch_size // cfg.num_sample
        self.batches_per_epoch: int | None = None
        if not cfg.resampled:
            if counts is None:
                raise ValueError(f"exact epochs (resampled=False) need sample counts: point shards at the "
                                 f"folder or index.json written by vmae-shards build, not {cfg.shards!r}")
            self.batches_per_epoch = sum(counts) // (world_size * self.videos_per_batch)
            if len(self.urls) < world_size * self.workers:
                log.warning("exact epochs: %d shards for %d ranks x %d workers; some shards are read by more "
                            "than one reader per epoch (build smaller shards for exact coverage)",
                            len(self.urls), world_size, self.workers)
            if self.batches_per_epoch < 1:
                raise ValueError(f"{sum(counts)} clips cannot give every one of {world_size} ranks a batch of "
                                 f"{self.videos_per_batch} clips")
        self._k = 0
        self._pos = [initial_position(w) for w in range(self.workers)]
        self._it: Iterator[dict] | None = None

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a resampled loader is endless; set resampled=False for epochs")
        return self.batches_per_epoch

    def _start(self) -> Iterator[dict]:
        ds = ClipStream(self.urls, self.cfg, videos_per_batch=self.videos_per_batch, rank=self.rank,
                        world_size=self.world_size, seed=self.seed, start=copy.deepcopy(self._pos),
                        rotation=self._k % self.workers, batches_per_epoch=self.batches_per_epoch)
        nw = self.cfg.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=nw,
                        pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                        persistent_workers=self.cfg.persistent_workers and nw > 0,
                        prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
                        generator=torch.Generator())  # leave the global RNG of training untouched
        return iter(dl)

    def __iter__(self) -> Iterator[dict]:
        if self._it is None:
            self._it = self._start()
        stop = None if self.batches_per_epoch is None else (self._k // self.batches_per_epoch + 1) * \
            self.batches_per_epoch
        while stop is None or self._k < stop:
            raw = next(self._it)
            pos = raw.pop("__pos__")
            old, self._pos[pos["worker"]] = self._pos[pos["worker"]], pos
            if pos["corrupt"] > old["corrupt"] or len(pos["bad_shards"]) > len(old["bad_shards"]):
                # Said again here, in the training process, where the run's log handlers live.
                st = self.stats()
                log.warning("data: %d corrupt samples skipped so far; unreadable shards: %s; latest: %s",
                            st["corrupt_samples"], sorted(st["bad_shards"]) or "none",
                            pos["recent"][-1] if pos["recent"] else "")
            self._k += 1
            out = {"video": raw["video"]}
            if self.labels:
                out["label"] = raw["label"]
            if self.mask_fn is not None:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self._k, "mask"))
                enc, dec = self.mask_fn(self.batch_size, gen)
                out["encoder_mask"] = enc
                if dec is not None:
                    out["decoder_mask"] = dec
            yield out

    @property
    def epoch(self) -> int:
        return 0 if self.batches_per_epoch is None else self._k // self.batches_per_epoch

    def _fingerprint(self) -> dict:
        return {"batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "seed": self.seed, "num_workers": self.workers, "num_shards": len(self.urls),
                "resampled": self.cfg.resampled, "num_sample": self.cfg.num_sample}

    def state_dict(self) -> dict:
        """JSON-serialisable position: batches consumed and where every worker's stream stands."""
        return {"version": 1, "batches": self._k, "positions": copy.deepcopy(self._pos), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the saved batch (restarts the worker processes)."""
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(f"loader state does not match this loader: {key} is {state.get(key)!r} in "
                                 f"the state, {value!r} here")
        self.close()
        self._k = int(state["batches"])
        self._pos = copy.deepcopy(state["positions"])

    def stats(self) -> dict:
        """Counts over all workers: decoded clips, skipped corrupt samples, unreadable shards by name."""
        bad: dict[str, int] = {}
        for p in self._pos:
            for name, n in p["bad_shards"].items():
                bad[name] = bad.get(name, 0) + n
        return {"batches": self._k, "decoded_clips": sum(p["decoded"] for p in self._pos),
                "corrupt_samples": sum(p["corrupt"] for p in self._pos), "bad_shards": bad,
                "recent_problems": [r for p in self._pos for r in p["recent"]]}

    def close(self) -> None:
        """Stop the worker processes (they are restarted by the next iteration)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def build_pretrain_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                          mask_fn: MaskFn | None) -> PretrainLoader:
    """The pretraining loader of one rank; see PretrainLoader for what it yields."""
    return PretrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                          mask_fn=mask_fn)
