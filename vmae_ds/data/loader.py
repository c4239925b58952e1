"""`PretrainLoader`: the rank's view of the stream, with exact save/restore, elastic resume and per-batch masks.

Batches come from the workers in a fixed round-robin (the DataLoader's in-order mode), so batch k of
a rank is local batch k // W of logical worker k % W. After a restore at k, DataLoader worker i plays
logical worker (i + k) % W, so the first batch again comes from the right worker. Worker positions only
advance when a batch reaches this process, so restarting the workers (after a crash, a hang, or a
restore) replays nothing and loses nothing.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset

from vmae_ds.data import nvdec
from vmae_ds.data.config import DataConfig
from vmae_ds.data.remote import Remote, ShardOpener
from vmae_ds.data.shards import (
    EpochLayout,
    OldReader,
    PassLayout,
    config_shards,
    deal,
    dealt_before,
    derive_seed,
    layout_from_json,
    settle,
    shards_digest,
    unread,
)
from vmae_ds.data.stream import (
    COUNTERS,
    NAMED,
    ClipStream,
    MultiScaleCrops,
    Transform,
    initial_position,
    prepare_worker,
)
from vmae_ds.masking import TokenGrid, make_masks

log = logging.getLogger("vmae_ds.data")
MaskFn = Callable[[int, torch.Generator], "tuple[torch.Tensor, torch.Tensor | None]"]
STATE_VERSION = 2
GIB, MIB = 2 ** 30, 2 ** 20
FAULTS = ("crash", "hang")


class LoaderStateError(ValueError):
    """A saved loader state that cannot continue here; the message names the field."""


class SharedMemoryError(ValueError):
    """/dev/shm cannot hold the batches in flight; the message gives the size needed and the fixes."""


def default_mask_fn(grid: TokenGrid, encoder_kind: str = "tube", encoder_ratio: float = 0.9,
                    decoder_kind: str = "running_cell", decoder_ratio: float = 0.5) -> MaskFn:
    """The paper's masks: tube 90 % for the encoder, running cell 50 % for the decoder."""

    def mask_fn(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return make_masks(encoder_kind, encoder_ratio, decoder_kind, decoder_ratio, batch_size, grid, generator)

    return mask_fn


def token_grid(cfg: DataConfig, patch: int = 16, tubelet: int = 2) -> TokenGrid:
    """The model's token grid for this data config (16 frames, 224, p16 -> 8 x 14 x 14)."""
    return TokenGrid(cfg.num_frames // tubelet, cfg.input_size // patch, cfg.input_size // patch)


def batch_bytes(cfg: DataConfig, batch_size: int) -> int:
    """Bytes of one batch: uint8 video + labels + two bool masks on the finest token grid in use (p14)."""
    tokens = max(cfg.num_frames // 2, 1) * max(cfg.input_size // 14, 1) ** 2
    return batch_size * (3 * cfg.num_frames * cfg.input_size ** 2 + 8 + 2 * tokens)


def _size(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def check_shared_memory(path: str, need: int, detail: str, statvfs: Callable[[str], Any] = os.statvfs) -> None:
    """Fail in one line when `path` (/dev/shm) has less free space than the batches in flight need."""
    try:
        st = statvfs(path)
    except FileNotFoundError:
        log.info("data: %s does not exist; not checking shared memory", path)
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        suggest = max(1, math.ceil(need * 1.5 / GIB))
        raise SharedMemoryError(
            f"data: {path} has {_size(free)} free but the loader needs {_size(need)} for batches in flight "
            f"({detail}): give the container more shared memory (docker run --shm-size={suggest}g), or lower "
            f"num_workers, prefetch_factor or max_inflight_gib, or the batch size")


class WorkerSupervisor:
    """Runs one DataLoader over `make_dataset(records_folder, quarantine)` and survives its workers.

    A worker that dies (segfault in the decoder, OOM kill) shows up as "exited unexpectedly" in the batch
    wait; one stuck on a sample for more than `decode_timeout_s` is found from the in-flight files when
    the wait times out (the DataLoader's `timeout` is a short poll). Either way the sample it was on is
    quarantined (never decoded again), the workers are shut down, and `make_dataset` is called again:
    the owner restarts them from its positions. Torch's SIGCHLD handler would raise in the main thread at
    any point when a worker dies; each DataLoader's workers are unregistered from it (and held at a gate
    until that is done), so a death is only ever noticed here, in the wait.
    """

    def __init__(self, make_dataset: Callable[[str | None, frozenset[str]], IterableDataset], *, num_workers: int,
                 prefetch_factor: int, pin_memory: bool, decode_timeout_s: float, what: str,
                 quarantine: Iterable[str] = (), collate_fn: Callable | None = None):
        self.make_dataset, self.num_workers, self.prefetch_factor = make_dataset, num_workers, prefetch_factor
        self.pin_memory, self.timeout, self.what = pin_memory, decode_timeout_s, what
        self.collate_fn = collate_fn
        self.quarantine: set[str] = set(quarantine)
        self.crashed: list[str] = []
        self.hung: list[str] = []
        self.restarts = 0
        self._it: Iterator | None = None
        self._folder: str | None = None
        self._blind = 0  # restarts in a row that could not name a sample
        self._slow_noted = 0.0
        # Workers ignore SIGTERM, and multiprocessing's exit handler SIGTERMs daemonic children and then
        # joins them: kill ours first (atexit runs handlers last-registered first; torch registered earlier).
        self._at_exit = functools.partial(_kill_at_exit, weakref.ref(self))
        self._exit_hook = False

    def next(self) -> Any:
        """The next item; StopIteration when a finite dataset is done."""
        while True:
            if self._it is None:
                self._it = self._start()
            try:
                item = next(self._it)
            except RuntimeError as e:
                if not self.num_workers:
                    raise
                text = str(e)
                if "timed out after" in text:
                    stuck = self._stuck()
                    if stuck:
                        self._recover(stuck, "hung")
                    continue
                if "exited unexpectedly" in text:
                    self._recover(self._dead(text), "crashed")
                    continue
                raise
            except ConnectionError:  # a worker died while its batch was being received (fds passed by socket)
                dead = self._reaped()
                if not dead:
                    raise
                self._recover(self._dead(f"pid(s) {', '.join(map(str, dead))})"), "crashed")
                continue
            self._blind = 0
            return item

    def _reaped(self, wait_s: float = 2.0) -> list[int]:
        """Pids of this DataLoader's workers that have exited (waiting briefly for one that is exiting)."""
        workers = list(getattr(self._it, "_workers", []))
        end = time.monotonic() + wait_s
        while True:
            dead = [w.pid for w in workers if not w.is_alive()]
            if dead or time.monotonic() > end:
                return dead
            time.sleep(0.05)

    def _start(self) -> Iterator:
        nw = self.num_workers
        if nw and self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="vmae-loader-")
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        if nw and not self._exit_hook:
            atexit.register(self._at_exit)
            self._exit_hook = True
        if self._folder:
            for f in Path(self._folder).iterdir():
                f.unlink(missing_ok=True)
        ds = self.make_dataset(self._folder if nw else None, frozenset(self.quarantine))
        dl = DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=self.collate_fn,
                        pin_memory=self.pin_memory,
                        prefetch_factor=self.prefetch_factor if nw else None,
                        timeout=min(1.0, self.timeout / 2) if nw else 0,
                        worker_init_fn=functools.partial(prepare_worker, os.getpid()) if nw else None,
                        generator=torch.Generator())  # leave the global RNG of training untouched
        it = iter(dl)
        if nw:
            if getattr(it, "_worker_pids_set", False):  # see the class docstring
                from torch.utils.data._utils import signal_handling

                signal_handling._remove_worker_pids(id(it))
                it._worker_pids_set = False
            Path(self._folder, "go").touch()
        return it

    def _records(self) -> list[dict]:
        out = []
        for f in Path(self._folder).glob("w*.json") if self._folder else []:
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def _stuck(self) -> list[dict]:
        now = time.monotonic()
        busy = [r for r in self._records() if r.get("state") == "decoding"]
        stuck = [r for r in busy if now - r["t"] > self.timeout]
        if not stuck and now - self._slow_noted > max(self.timeout, 60):
            self._slow_noted = now  # a slow batch, not a stuck decoder: say so now and then, keep waiting
            if busy and now - min(r["t"] for r in busy) > self.timeout / 2:
                log.info("data: %s: waiting for a batch; decoding %s", self.what,
                         ", ".join(f"{r['key']} ({now - r['t']:.0f} s)" for r in busy))
        return stuck

    def _dead(self, text: str) -> list[dict]:
        m = re.search(r"pid\(s\) ([\d, ]+)\)", text)
        pids = {int(p) for p in re.findall(r"\d+", m.group(1))} if m else set()
        recs = [r for r in self._records() if r.get("pid") in pids]
        return recs or [{"pid": p, "state": "unknown"} for p in sorted(pids)]

    def _recover(self, culprits: list[dict], kind: str) -> None:
        named = [c for c in culprits if c.get("state") == "decoding" and c.get("key")]
        how = f"was stuck for more than {self.timeout:g} s" if kind == "hung" else "died"
        for c in named:
            if c["key"] not in self.quarantine:
                self.quarantine.add(c["key"])
                (self.hung if kind == "hung" else self.crashed).append(c["key"])
            log.warning("data: %s: loader worker %s (pid %s) %s while decoding %s; quarantined it (never decoded "
                        "again) and restarting the workers at the last delivered batch", self.what, c.get("w"),
                        c.get("pid"), how, c["key"])
        if not named:
            self._blind += 1
            pids = [c.get("pid") for c in culprits]
            log.warning("data: %s: loader worker(s) %s %s outside any decode; restarting the workers at the last "
                        "delivered batch", self.what, pids, how)
            if self._blind > 3:
                raise RuntimeError(f"data: {self.what}: loader workers died {self._blind} times in a row without "
                                   f"a sample in flight (pids {pids}); not a bad video: check memory (OOM killer) "
                                   f"and /dev/shm")
        mine = set(self.worker_pids())
        for c in culprits:
            if kind == "hung" and c.get("pid") in mine:
                os.kill(c["pid"], signal.SIGKILL)  # it ignores SIGTERM; it is ours, named by pid
        self._stop()
        self.restarts += 1

    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._it, "_workers", []) if w.is_alive()]

    def kill_workers(self) -> None:
        for pid in self.worker_pids():
            os.kill(pid, signal.SIGKILL)

    def _stop(self) -> None:
        it, self._it = self._it, None
        if it is None:
            return
        workers = list(getattr(it, "_workers", []))
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        for w in workers:  # workers ignore SIGTERM, so torch's terminate() may have left some
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
                w.join(timeout=5)

    def close(self) -> None:
        self._stop()
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if self._exit_hook:
            atexit.unregister(self._at_exit)
            self._exit_hook = False


def _kill_at_exit(ref: weakref.ref) -> None:
    sup = ref()
    if sup is not None:
        sup.kill_workers()


def _empty_carried() -> dict:
    return {**dict.fromkeys(COUNTERS, 0), **{k: {} for k in NAMED}, "recent": []}


class PretrainLoader:
    """Iterable of batches {video uint8 (B, 3, T, S, S), keys [B], encoder_mask (B, N), decoder_mask (B, N)}.

    `batch_size` counts samples after repeated augmentation: each decoded clip gives `num_sample` of
    them, so batch_size / num_sample clips are decoded per step. `keys[i]` is '<shard name>/<key>' of
    sample i (the repeats of a clip share it).

    Exact-epoch mode (default when index.json gives the counts): every sample once per epoch across all
    ranks and workers; the stream runs on across epochs (a batch may hold the end of one epoch and the start
    of the next), and one `iter()` pass yields `len(loader)` batches. Resampled mode iterates forever.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 mask_fn: MaskFn | None, labels: bool = False, transform: Transform | None = None,
                 quarantine: Iterable[str] = (), fault_keys: dict[str, str] | None = None,
                 statvfs: Callable[[str], Any] = os.statvfs, local_ranks: int | None = None):
        if batch_size < cfg.num_sample or batch_size % cfg.num_sample:
            raise ValueError(f"batch_size {batch_size} must be a multiple of num_sample {cfg.num_sample} "
                             "(it counts samples after repeated augmentation)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        bad = {k: v for k, v in (fault_keys or {}).items() if v not in FAULTS}
        if bad:
            raise ValueError(f"fault_keys values must be one of {FAULTS}, got {bad}")
        if fault_keys and cfg.num_workers == 0:
            raise ValueError("fault_keys need num_workers >= 1 (a crash in the main process cannot be survived)")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.mask_fn, self.labels, self.fault_keys = mask_fn, labels, dict(fault_keys or {})
        self.transform = transform or MultiScaleCrops(cfg)
        self._nvdec = _nvdec_decoder(cfg, transform)
        shard_set = config_shards(cfg)
        self.urls, self.counts = shard_set.urls, shard_set.counts
        self.opener = ShardOpener(Remote.of(cfg), shard_set.sizes)
        self.workers = max(cfg.num_workers, 1)
        self.videos_per_batch = batch_size // cfg.num_sample
        self.mode = self._pick_mode()
        self.batches_per_epoch: int | None = None
        if self.mode == "exact":
            total = sum(self.counts)
            self.batches_per_epoch = total // (world_size * self.videos_per_batch)
            if self.batches_per_epoch < 1:
                raise ValueError(f"{total} clips cannot give every one of {world_size} ranks a batch of "
                                 f"{self.videos_per_batch} clips")
        self.layout = self._fresh_layout()
        self._k = 0
        self._pos = [initial_position(w) for w in range(self.workers)]
        self._carried = _empty_carried()
        self._plan_memory(statvfs, local_ranks)
        self._sup = WorkerSupervisor(
            self._dataset, num_workers=cfg.num_workers, prefetch_factor=self.prefetch_factor,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(), decode_timeout_s=cfg.decode_timeout_s,
            what=f"rank {rank}", quarantine=quarantine)

    def _pick_mode(self) -> str:
        if self.cfg.resampled is None:
            return "exact" if self.counts is not None else "resampled"
        if not self.cfg.resampled and self.counts is None:
            raise ValueError(f"exact epochs (resampled=False) need sample counts: point shards at the folder or "
                             f"index.json written by vmae-shards build, not {self.cfg.shards!r}")
        return "resampled" if self.cfg.resampled else "exact"

    def _fresh_layout(self) -> EpochLayout | PassLayout:
        if self.mode == "exact":
            return EpochLayout(self.counts, self.seed, self.world_size, self.workers, self.rank,
                               vpb=self.videos_per_batch)
        return PassLayout(len(self.urls), self.seed, self.world_size, self.workers, self.rank)

    def _plan_memory(self, statvfs: Callable[[str], Any], local_ranks: int | None) -> None:
        """Bound the batches in flight (workers x prefetch) by max_inflight_gib; check /dev/shm holds them."""
        cfg, nw = self.cfg, self.cfg.num_workers
        self.batch_bytes = batch_bytes(cfg, self.batch_size)
        self.prefetch_factor = cfg.prefetch_factor
        self.memory_line = f"data: rank {self.rank}: no loader workers, one batch at a time"
        if nw == 0:
            return
        bound = cfg.max_inflight_gib * GIB
        fit = int(bound // (nw * self.batch_bytes))
        self.prefetch_factor = max(1, min(cfg.prefetch_factor, fit))
        inflight = nw * self.prefetch_factor * self.batch_bytes
        self.memory_line = (f"data: rank {self.rank}: {nw} workers x prefetch {self.prefetch_factor} x "
                            f"{_size(self.batch_bytes)} per batch = {_size(inflight)} in flight "
                            f"(max_inflight_gib {cfg.max_inflight_gib:g}"
                            + (f"; prefetch_factor {cfg.prefetch_factor} lowered to fit)" if
                               self.prefetch_factor < cfg.prefetch_factor else ")"))
        (log.warning if fit < 1 else log.info)(
            self.memory_line + ("; even one batch per worker exceeds the bound: use fewer num_workers"
                                if fit < 1 else ""))
        ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        check_shared_memory(cfg.shm_path, ranks * inflight,
                            f"{ranks} rank(s) on this node x {nw} workers x prefetch {self.prefetch_factor} x "
                            f"{_size(self.batch_bytes)} per batch", statvfs)

    def _dataset(self, records: str | None, quarantine: frozenset[str]) -> ClipStream:
        return ClipStream(self.urls, self.cfg, layout=self.layout, videos_per_batch=self.videos_per_batch,
                          seed=self.seed, start=copy.deepcopy(self._pos), rotation=self._k % self.workers,
                          transform=self.transform, quarantine=quarantine, records=records,
                          fault_keys=self.fault_keys, opener=self.opener)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a resampled loader is endless; exact epochs need sample counts (index.json)")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        bpe = self.batches_per_epoch
        stop = None if bpe is None else (self._k // bpe + 1) * bpe
        while stop is None or self._k < stop:
            raw = self._sup.next()
            pos = raw.pop("__pos__")
            old, self._pos[pos["worker"]] = self._pos[pos["worker"]], pos
            if pos["corrupt"] > old["corrupt"] or len(pos["bad_shards"]) > len(old["bad_shards"]) or \
                    pos["missing"] > old["missing"]:
                # Said again here, in the training process, where the run's log handlers live.
                st = self.stats()
                log.warning("data: %d corrupt samples skipped so far, %d missing; problem shards: %s; latest: %s",
                            st["corrupt_samples"], st["missing_samples"], sorted(st["bad_shards"]) or "none",
                            pos["recent"][-1] if pos["recent"] else "")
            self._k += 1
            video = raw["video"] if self._nvdec is None else self._nvdec.batch(raw["video"])  # decoded by .to()
            out = {"video": video, "keys": raw["keys"]}
            if self.labels:
                out["label"] = raw["label"]
            if self.mask_fn is not None:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, self.layout.gen, self.rank, self._k,
                                                                "mask"))
                enc, dec = self.mask_fn(self.batch_size, gen)
                out["encoder_mask"] = enc
                if dec is not None:
                    out["decoder_mask"] = dec
            yield out

    @property
    def epoch(self) -> int:
        """Exact mode: the first epoch this rank's readers have not all finished. Resampled: the lowest pass."""
        return min(p["epoch"] for p in self._pos)

    def progress(self) -> dict:
        """Where this rank stands: epoch, samples of it read by this rank (incl. skipped ones) and its share."""
        e = self.epoch
        if self.mode != "exact":
            return {"mode": self.mode, "epoch": e, "epoch_samples_read": None, "epoch_samples": None,
                    "batches": self._k}
        read = 0
        for w, p in enumerate(self._pos):
            pieces = self.layout.slice(w, e)
            if p["epoch"] > e:
                read += sum(len(x) for x in pieces)
            elif p["epoch"] == e:
                read += sum(len(x) for x in pieces[:p["chunk"]]) + p["offset"]
        return {"mode": self.mode, "epoch": e, "epoch_samples_read": read,
                "epoch_samples": self.layout.rank_share(e), "batches": self._k}

    # ---- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable: batches consumed, every reader's position, the layout, quarantine and counters."""
        return {"version": STATE_VERSION, "mode": self.mode, "batches": self._k, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.workers, "batch_size": self.batch_size,
                "seed": self.seed, "num_sample": self.cfg.num_sample, "num_shards": len(self.urls),
                "shards": shards_digest(self.urls, self.counts), "shuffle_block": self.cfg.shuffle_block,
                "layout": self.layout.to_json(), "positions": copy.deepcopy(self._pos),
                "carried": copy.deepcopy(self._carried), "quarantine": sorted(self._sup.quarantine),
                "crashed": list(self._sup.crashed), "hung": list(self._sup.hung), "restarts": self._sup.restarts}

    def _check(self, state: dict, *fields: str) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')!r} is not {STATE_VERSION} (written "
                                   f"by another vmae_ds version): it cannot be continued by this loader")
        mine = {"mode": self.mode, "seed": self.seed, "num_sample": self.cfg.num_sample,
                "num_shards": len(self.urls), "shards": shards_digest(self.urls, self.counts),
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank}
        for key in ("mode", "seed", "num_sample", "num_shards", "shards", *fields):
            if state.get(key) != mine[key]:
                hint = ("; for another world size use load_elastic(states of all old ranks)"
                        if key in ("world_size", "rank") else "")
                what = "shard names/counts" if key == "shards" else key
                raise LoaderStateError(f"loader state does not match this loader: {what} is {state.get(key)!r} in "
                                       f"the state, {mine[key]!r} here{hint}")

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue exactly after the saved batch (restarts the workers). Same world size required; a
        different num_workers (or shuffle_block) re-deals this rank's unread samples among the new workers.
        Returns what changed, one line each (empty when nothing did)."""
        self._check(state, "world_size", "rank", "batch_size")
        if state["num_workers"] != self.workers or state["shuffle_block"] != self.cfg.shuffle_block:
            return self._redeal([state], local=True)
        self._sup.close()
        self._k = int(state["batches"])
        self._pos = copy.deepcopy(state["positions"])
        self.layout = layout_from_json(state["layout"], len(self.urls), self.counts, self.seed)
        self._carried = copy.deepcopy(state["carried"])
        self._sup.quarantine |= set(state["quarantine"])
        self._sup.crashed, self._sup.hung = list(state["crashed"]), list(state["hung"])
        self._sup.restarts = int(state["restarts"])
        return []

    def load_elastic(self, states: list[dict]) -> list[str]:
        """Continue from the saved states of ALL ranks of a run with any world size / num_workers.

        Exact mode: the unread samples of each begun epoch are re-dealt among the new readers (none skipped,
        none repeated), later epochs use the new split. Resampled mode: fresh passes. The same layout is an
        exact resume. Returns human-readable lines saying what changed.
        """
        if not states:
            raise LoaderStateError("load_elastic needs the loader states of all ranks of the old run, got none")
        for s in states:
            self._check(s)
        old_world = states[0].get("world_size")
        ranks = sorted(s.get("rank") for s in states)
        if any(s.get("world_size") != old_world for s in states) or ranks != list(range(old_world)):
            raise LoaderStateError(f"load_elastic needs one state per rank of the old run: got ranks {ranks} "
                                   f"for world sizes {sorted({s.get('world_size') for s in states})}")
        states = sorted(states, key=lambda s: s["rank"])
        same = old_world == self.world_size and all(
            s["num_workers"] == self.workers and s["shuffle_block"] == self.cfg.shuffle_block
            and s["batch_size"] == self.batch_size for s in states)
        if same:
            self.load_state_dict(states[self.rank])
            self._sup.quarantine |= {k for s in states for k in s["quarantine"]}
            return [f"loader: same layout ({old_world} ranks x {self.workers} workers): exact resume"]
        return self._redeal(states, local=False)

    def _redeal(self, states: list[dict], local: bool) -> list[str]:
        self._sup.close()
        old_world, old_workers = states[0]["world_size"], states[0]["num_workers"]
        k = max(int(s["batches"]) for s in states)
        gen = max(int(s["layout"]["gen"]) for s in states) + 1
        lines = [f"loader: resuming {old_world} rank(s) x {old_workers} worker(s) as {self.world_size} rank(s) x "
                 f"{self.workers} worker(s)" + (" (this rank's samples only: same world size)" if local else "")]
        if states[0]["batch_size"] != self.batch_size:
            lines.append(f"loader: batch size {states[0]['batch_size']} -> {self.batch_size}")
        if self.mode == "exact":
            layouts = [layout_from_json(s["layout"], len(self.urls), self.counts, self.seed) for s in states]
            readers = [OldReader(lay, w, copy.deepcopy(p), s["shuffle_block"])
                       for s, lay in zip(states, layouts, strict=True) for w, p in enumerate(s["positions"])]
            first, left = unread(readers)
            world, rank = (1, 0) if local else (self.world_size, self.rank)
            explicit, origin = deal(left, world, self.workers, rank, k * self.videos_per_batch,
                                    self.videos_per_batch)
            base = max(left) + 1 if left else first
            self.layout = EpochLayout(self.counts, self.seed, self.world_size, self.workers, self.rank,
                                      vpb=self.videos_per_batch, gen=gen, base=base, origin=origin,
                                      explicit=explicit)
            for e in sorted(left):
                per = [sum(len(p) for p in explicit[w][e]) for w in range(self.workers)]
                lines.append(f"loader: epoch {e}: {sum(len(p) for p in left[e])} samples not yet read "
                             f"{'by this rank ' if local else ''}re-dealt; this rank reads {sum(per)} of them "
                             f"(workers: {', '.join(map(str, per))})")
            lines.append(f"loader: epochs from {base} on use the new split")
        else:
            first = max(p["epoch"] for s in states for p in s["positions"]) + 1
            self.layout = PassLayout(len(self.urls), self.seed, self.world_size, self.workers, self.rank, gen=gen,
                                     base=first)
            lines.append(f"loader: resampled mode: the readers start fresh passes at pass {first} (the passes "
                         f"under way are not finished)")
        self._k = k
        self._pos = [initial_position(w, batch=dealt_before(k, self.workers, w), epoch=first)
                     for w in range(self.workers)]
        if self.mode == "exact":
            for w, p in enumerate(self._pos):
                settle(self.layout, w, p)
        mine = states if local else [s for s in states if s["rank"] % self.world_size == self.rank]
        self._carried = _empty_carried()
        for s in mine:
            for part in [s["carried"], *s["positions"]]:
                _add_counts(self._carried, part)
        self._sup.quarantine |= {q for s in states for q in s["quarantine"]}
        self._sup.crashed = [c for s in mine for c in s["crashed"]]
        self._sup.hung = [h for s in mine for h in s["hung"]]
        self._sup.restarts = sum(int(s["restarts"]) for s in mine)
        if self._sup.quarantine:
            lines.append(f"loader: {len(self._sup.quarantine)} quarantined key(s) carried over")
        for line in lines:
            log.info(line)
        return lines

    # ---- reporting -------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts over this rank's readers: decoded clips, skipped corrupt / quarantined / missing samples,
        problem shards by name, recent problems, the keys that crashed or hung a decoder, and the shard reads:
        bytes from storage and from the cache, seconds blocked on reads, retries, unreachable shards by name."""
        tot = copy.deepcopy(self._carried)
        for p in self._pos:
            _add_counts(tot, p)
        return {"batches": self._k, "decoded_clips": tot["decoded"], "corrupt_samples": tot["corrupt"],
                "quarantined_skipped": tot["quarantined"], "missing_samples": tot["missing"],
                "bad_shards": tot["bad_shards"], "recent_problems": tot["recent"],
                "crashed": list(self._sup.crashed), "hung": list(self._sup.hung), "restarts": self._sup.restarts,
                "quarantine": sorted(self._sup.quarantine), "bytes_read": tot["bytes_read"],
                "cached_bytes": tot["cached_bytes"], "read_s": tot["read_ms"] / 1000, "read_retries": tot["retries"],
                "unreachable_shards": tot["unreachable"]} | \
            ({"nvdec": self._nvdec.stats.as_dict()} if self._nvdec is not None else {})

    def worker_pids(self) -> list[int]:
        """Process ids of the live loader workers (empty before the first batch and after close())."""
        return self._sup.worker_pids()

    def host_memory_bytes(self) -> int:
        """Resident memory of this process plus its loader workers (shared pages count in each)."""
        total = psutil.Process().memory_info().rss
        for pid in self.worker_pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        return total

    def close(self) -> None:
        """Stop the worker processes (they are restarted by the next iteration)."""
        self._sup.close()


def _nvdec_decoder(cfg: DataConfig, transform: Transform | None) -> nvdec.NvdecDecoder | None:
    """backend nvdec: the main process's GPU decoder, or a one-line refusal (no CUDA, no PyNvVideoCodec, or a
    custom per-clip transform, which needs decoded frames in the workers)."""
    if cfg.backend != "nvdec":
        return None
    if transform is not None and not isinstance(transform, MultiScaleCrops):
        raise nvdec.NvdecUnavailable("data.backend nvdec makes the default multi-scale crops on the GPU; a custom "
                                     "per-clip transform (fine-tuning) runs on decoded frames in the workers: use "
                                     "backend pyav or decord")
    nvdec.check_available()
    return nvdec.NvdecDecoder(cfg)


def _add_counts(into: dict, part: dict) -> None:
    for c in COUNTERS:  # .get: states saved before a counter existed
        into[c] = into.get(c, 0) + int(part.get(c, 0))
    for kind in NAMED:
        into.setdefault(kind, {})
        for name, n in part.get(kind, {}).items():
            into[kind][name] = into[kind].get(name, 0) + n
    into["recent"] = (into["recent"] + list(part.get("recent", [])))[-32:]


def build_pretrain_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                          mask_fn: MaskFn | None, quarantine: Iterable[str] = (),
                          fault_keys: dict[str, str] | None = None) -> PretrainLoader:
    """The pretraining loader of one rank; see PretrainLoader for what it yields."""
    return PretrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                          mask_fn=mask_fn, quarantine=quarantine, fault_keys=fault_keys)
