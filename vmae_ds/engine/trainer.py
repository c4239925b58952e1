"""The training loop, for every objective: build (data, model under zero.Init, DeepSpeed), resume, train, save.

What the loop guarantees, whatever the objective:
- the lr of every step is a function of the videos seen (`lr_at`), so a run continues its schedule exactly;
- a step whose gradients are not finite on any rank is skipped on every rank (DeepSpeed's own agreed
  overflow check, once per optimizer step: no host sync of ours inside the step), counted, and retried with
  the next batch; `max_consecutive_nonfinite` in a row stop the run;
- SIGTERM (pre-emption) is agreed between ranks at step boundaries over a host-side group: the ranks save
  the step they are in and exit 143;
- checkpoints carry model, optimizer, loader position, RNG states and the objective's state, and resuming
  reproduces an uninterrupted run step for step.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ..config import ConfigError
from . import checkpoint as ckpt
from .data_source import batches_per_epoch, endless
from .device import StepTimer, SyncCounter
from .ds_setup import build_engine, gathered_state, resolve_ds_config
from .launch import (
    init_process_group,
    portable_config,
    quiet_library_warnings,
    set_rank_threads,
    single_process_env,
    world_from_env,
)
from .memory_check import check_memory
from .metrics import PEAK_BF16_FLOPS, MetricsWriter, detect_device_name, peak_memory_gib, progress_line, say
from .optim import Derived, derive, lr_at
from .preemption import Preemption
from .prefetch import BatchPrefetcher
from .probe import InRunProbe, plot_probe
from .quarantine import read_quarantine, write_quarantine
from .resume import resume_conflicts
from .run_config import RunConfig
from .storage_report import StorageMeter, read_totals

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after the checkpoint is safely written


class RunStopped(RuntimeError):
    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.code = code


def prepare(cfg: RunConfig, loader: Any) -> tuple[Derived, dict]:
    """Derived recipe values + the validated DeepSpeed dict (no process group needed: fails fast)."""
    _, world = world_from_env()
    d = derive(cfg.optim, world_size=world, num_sample=cfg.data.num_sample,
               batches_per_epoch=batches_per_epoch(cfg, loader, world))
    return d, resolve_ds_config(cfg, d)


@dataclasses.dataclass
class Counters:
    step: int = 0  # optimizer steps taken
    batches: int = 0  # micro-batches drawn (skipped ones included)
    videos: int = 0  # videos (before num_sample) of applied steps, over all ranks: the schedule's clock
    nonfinite_total: int = 0


class Window:
    """Per-step values kept on the device until the metrics are written (one read-back per log line)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.losses: list[torch.Tensor] = []  # per step: (micro-batches,) this rank's losses
        self.extras: list[dict[str, torch.Tensor]] = []

    def add(self, info: dict, losses: list[torch.Tensor], extras: list[dict[str, torch.Tensor]]) -> None:
        self.steps.append(info)
        self.losses.append(torch.stack(losses))
        merged = {k: torch.stack([e[k].detach().float() for e in extras]).mean() for k in (extras[0] if extras else {})}
        self.extras.append(merged)

    def read(self, world: int) -> list[tuple[dict, list[float], dict[str, float]]]:
        """Every rank: (step info, losses per micro-batch averaged over ranks, extras) per step; one
        all-reduce for the whole window."""
        flat = torch.cat(self.losses).to(torch.float64)
        names = sorted(self.extras[0]) if self.extras else []
        ext = torch.stack([torch.stack([e[k] for k in names]) for e in self.extras]).to(torch.float64) \
            if names else None
        dist.all_reduce(flat)
        if ext is not None:
            dist.all_reduce(ext)
        values = flat.tolist()
        out, i = [], 0
        for j, per_step in enumerate(self.losses):
            n = per_step.numel()
            losses = [v / world for v in values[i:i + n]]
            i += n
            extras = {k: float(ext[j, q]) / world for q, k in enumerate(names)} if ext is not None else {}
            out.append((self.steps[j], losses, extras))
        self.__init__()
        return out


def train(cfg: RunConfig, resume: str | None, objective: Any) -> int:
    """Run (or resume) a training run of `objective`; returns the process exit code."""
    from deepspeed.accelerator import get_accelerator

    started = time.perf_counter()
    quiet_library_warnings()

    if single_process_env():
        say("no launcher environment (RANK, WORLD_SIZE): running 1 process; for more, start it with "
            "`deepspeed --num_gpus N --module vmae_ds.<entry point> ...`")
    rank, world = world_from_env()
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    if resume in (None, "", "none") and ckpt.read_pointer(ckpt_dir):
        raise RunStopped(f"{run_dir} already holds checkpoints (newest {ckpt.read_pointer(ckpt_dir)}): continue "
                         f"with --resume auto, or pick another name= / delete the folder", 2)
    try:  # before any process group or engine exists: a typo'd path costs seconds, not a ViT-g start-up
        folder = ckpt.resolve_resume(resume, ckpt_dir)
    except FileNotFoundError as e:
        raise RunStopped(f"error: {e}", 2) from None
    loader = objective.build_loader(rank, world)
    d, ds = prepare(cfg, loader)
    try:  # before any weights exist: a run that cannot fit stops here, in one line with the numbers
        memory = check_memory(cfg, ds, world, objective)
    except ConfigError as e:
        if hasattr(loader, "close"):
            loader.close()
        raise RunStopped(f"error: {e}", 2) from None
    meta = ckpt.read_meta(folder) if folder is not None else {}
    elastic = folder is not None and meta.get("world_size") != world
    if elastic and not hasattr(loader, "load_elastic"):  # before any process group or checkpoint conversion
        raise RunStopped(f"{folder} was written by {meta.get('world_size')} rank(s), this start has {world}: "
                         f"data.kind {cfg.data.kind} cannot be re-dealt to another world size (shards can); "
                         f"resume with {meta.get('world_size')} rank(s)", 2)
    if elastic:  # ZeRO shards of another world size: DeepSpeed's universal format re-partitions them
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    on_cpu = get_accelerator().device_name() == "cpu"
    workers = (cfg.shards_config().num_workers if cfg.data.kind == "shards" else 0)
    set_rank_threads(on_cpu, workers)
    host_group = init_process_group(on_cpu)
    universal = ckpt.universal_copy(folder, rank) if elastic else None
    config_yaml = yaml.safe_dump(portable_config(cfg), sort_keys=False)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        info = {"derived": dataclasses.asdict(d), "deepspeed_config": ds, "objective": objective.name,
                "memory_plan": memory.to_json() if memory else None}
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for line in d.lines(cfg.optim.base_lr):
            say(line)
        if getattr(loader, "memory_line", None):
            say(loader.memory_line)
        for line in memory.lines() if memory else []:
            say(line)
    engine, lines = build_engine(cfg, ds, objective,
                                 (memory.choice.mode, memory.choice.num_blocks) if memory else None)
    device = engine.device
    lines += objective.setup(device)
    if rank == 0:
        for line in lines:
            say(line)

    state = Counters()
    if folder is not None:
        state = _restore(engine, folder, cfg, world, loader, objective, rank, ckpt_dir, d, universal)
    else:
        if rank == 0 and resume == "auto":
            say(f"--resume auto: no complete checkpoint in {ckpt_dir}, starting fresh")
        seed_everything(cfg.seed + rank)

    loop = _Loop(cfg, d, engine, objective, loader, state, rank, world, run_dir, config_yaml, host_group,
                 last_ckpt=str(folder) if folder else "none")
    if rank == 0:  # start-up cost (model init, DeepSpeed's flattening, restore) is part of every benchmark's bill
        say(f"engine ready in {time.perf_counter() - started:.1f} s")
    return loop.run()


def seed_everything(seed: int) -> None:
    """torch, numpy and Python RNGs: device-side augmentation (timm's Mixup, random erasing) draws from all three."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _restore(engine: Any, folder: Path, cfg: RunConfig, world: int, loader: Any, objective: Any, rank: int,
             ckpt_dir: Path, d: Derived, universal: Path | None) -> Counters:
    from ..data.loader import LoaderStateError

    client, rank_state = ckpt.load(engine, folder, universal)
    changed = resume_conflicts(client.get("config", {}), cfg.model_dump(mode="json"))
    if changed:
        raise RunStopped(f"{folder} was trained with different settings: {', '.join(changed)}; "
                         f"resume with the run's own config (runs/<name>/config.yaml) or start a new run", 2)
    counters = client["counters"]
    old_world, old_batch = client["world_size"], client.get("global_batch", d.global_batch)
    state = Counters(step=counters["step"], batches=counters["batches"], nonfinite_total=counters["nonfinite_total"],
                     videos=counters.get("videos", counters["step"] * old_batch))
    lines = []
    try:
        if universal is None:
            lines = loader.load_state_dict(rank_state["loader"]) or []
            objective.load_state_dict(rank_state.get("objective", {}))
            ckpt.set_rng_state(rank_state["rng"])
        else:
            lines = loader.load_elastic([r["loader"] for r in ckpt.rank_states(folder)])
            # the old ranks' RNG streams do not map onto the new ones: fresh, but still a function of the run
            seed_everything(cfg.seed + rank + 7919 * state.step)
    except (LoaderStateError, ValueError) as e:
        raise RunStopped(f"{folder}: the data loader cannot continue from it: {e}", 2) from None
    if rank == 0:
        say(f"resumed from {folder} at step {state.step}")
        if universal is not None or old_batch != d.global_batch:
            lr = lr_at(state.videos / d.global_batch, d)
            say(f"elastic resume: world size {old_world} -> {world}, global batch {old_batch} -> {d.global_batch} "
                f"videos; the lr schedule continues at {state.videos} videos seen (lr {lr:.4g})"
                + (f"; ZeRO states re-partitioned from DeepSpeed's universal copy {universal}" if universal else ""))
        for line in lines:
            say(line)
        latest = ckpt.read_pointer(ckpt_dir) or ""
        for stale in ckpt_dir.glob("step_*"):  # newer than the pointer = half-written by a killed run
            if stale.name > latest:
                shutil.rmtree(stale, ignore_errors=True)
    return state


class _Loop:
    """One run's step loop; split from `train` so set-up and stepping read separately."""

    def __init__(self, cfg: RunConfig, d: Derived, engine: Any, objective: Any, loader: Any, state: Counters,
                 rank: int, world: int, run_dir: Path, config_yaml: str, host_group: Any, last_ckpt: str):
        self.cfg, self.d, self.engine, self.objective, self.loader = cfg, d, engine, objective, loader
        self.state, self.rank, self.world, self.run_dir = state, rank, world, run_dir
        self.config_yaml, self.host_group, self.last_ckpt = config_yaml, host_group, last_ckpt
        self.ckpt_dir = run_dir / "checkpoints"
        # the schedule runs on videos seen, so a resume on another world size ends where the recipe ends
        left = -(-(d.total_steps * d.global_batch - state.videos) // d.global_batch)
        self.stop_at = min(state.step + max(left, 0), cfg.optim.max_steps or 1 << 62)
        flops = objective.flops_per_sample()
        self.model_flops, self.teacher_flops = flops["model"], flops.get("teacher", 0.0)
        dev_name = cfg.logging.device_name or detect_device_name()
        self.peak = PEAK_BF16_FLOPS.get(dev_name) if dev_name else None
        if rank == 0 and self.peak is None:
            from deepspeed.accelerator import get_accelerator
            say(f"MFU: n/a (no peak-FLOPs entry for device {dev_name or get_accelerator().device_name()})")
        self.metrics = MetricsWriter(run_dir, rank == 0, cfg.logging.tensorboard, state.step)
        self.quarantine_written = read_quarantine(run_dir)
        self.storage = StorageMeter()  # shard reads per rank in the records (data_problems)
        self.keys_log = open(run_dir / f"keys.rank{rank}.jsonl", "a") if cfg.debug.log_keys else None
        self.probe = InRunProbe(cfg, rank, world, host_group) if cfg.probe is not None else None
        self.last_probe: dict | None = None  # the newest probe result (rank 0), shown in every progress line

    # ------------------------------------------------------------------ checkpoints
    def save(self, prefetch: BatchPrefetcher) -> None:
        s = self.state
        client = {"counters": dataclasses.asdict(s), "epoch": s.videos // self.videos_per_epoch(),
                  "world_size": self.world, "config": self.cfg.model_dump(mode="json"),
                  "objective": self.objective.name, "global_batch": self.d.global_batch}
        rank_state = {"loader": prefetch.state_dict(), "rng": ckpt.rng_state(),
                      "objective": self.objective.state_dict()}
        self.last_ckpt = str(ckpt.save(self.engine, self.ckpt_dir, s.step, client, rank_state, self.config_yaml,
                                       self.cfg.checkpoint.keep_last))

    def videos_per_epoch(self) -> int:
        return self.d.steps_per_epoch * self.d.global_batch

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg, engine, state = self.cfg, self.engine, self.state
        preempt = Preemption()
        stream = endless(self.loader)  # created after load_state_dict: it starts where the checkpoint left it
        prefetch = BatchPrefetcher(stream, self.objective.to_device, engine.device, self.loader.state_dict,
                                   fetch_delay_s=cfg.debug.fetch_sleep_s)
        prefetch.start()  # the first batch is fetched while the loop sets up
        timer = StepTimer(engine.device, phases=cfg.logging.breakdown)
        window = Window()
        nan_batches = set(cfg.debug.nan_batches)
        consecutive = 0
        first_step = state.step + 1
        syncs = SyncCounter(engine.device) if cfg.debug.sync_report else None
        if syncs is not None and not syncs.enabled and self.rank == 0:
            say("debug.sync_report: counts CUDA syncs only; nothing to count on this device")
        engine.train()
        in_step = True  # False once every rank is known to leave the loop together (safe to barrier)
        try:
            if self.probe is not None and state.step == 0 and cfg.probe.at_start:  # the initial weights' baseline
                self.record_probe(self.probe.run(engine, self.objective, 0), 0)
            while state.step < self.stop_at:
                if preempt.agreed(engine.device, self.host_group):
                    if window.steps:
                        self.flush(window, timer, first=False, quiet=True)
                    self.save(prefetch)
                    raise RunStopped(f"pre-empted (SIGTERM): checkpoint {self.last_ckpt} written at step "
                                     f"{state.step}; continue with --resume auto", EXIT_PREEMPTED)
                step = state.step
                if syncs is not None and step == first_step + 1:  # steps 3-5: past the first steps' set-up
                    syncs.start()
                lr = lr_at(state.videos / self.d.global_batch, self.d)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                wait0 = prefetch.wait_s
                timer.start()
                losses, extras = [], []
                first_batch = state.batches + 1
                for micro in range(cfg.optim.grad_accum):
                    # after SIGTERM no batch is drawn: the step boundary saves (the position of the next one)
                    batch = prefetch.next(fetch_following=not preempt.requested)
                    timer.mark("next_batch")  # the training thread's only batch work: wait + hand-over
                    state.batches += 1
                    if self.keys_log is not None:  # test audit: which clips every step consumed
                        self.keys_log.write(json.dumps({"batch": state.batches, "keys": prefetch.last_keys}) + "\n")
                        self.keys_log.flush()
                    loss, extra = self.objective.loss(engine, batch)
                    if state.batches in nan_batches and self.rank == 0:
                        loss = loss * float("nan")  # test hook: rank 0 only; the ranks must still agree
                    timer.mark("forward")
                    engine.backward(loss)
                    timer.mark("backward")
                    if cfg.debug.step_sleep_s and micro == cfg.optim.grad_accum - 1 and (
                            not cfg.debug.sleep_steps or step + 1 in cfg.debug.sleep_steps):
                        time.sleep(cfg.debug.step_sleep_s)
                    engine.step()
                    timer.mark("optimizer")  # at an accumulation boundary: clipping, the update, gathers
                    losses.append(loss.detach())
                    extras.append(extra)
                timer.stop()
                if getattr(engine.optimizer, "overflow", False):  # agreed by DeepSpeed over all ranks
                    timer.drop_last()
                    state.nonfinite_total += 1
                    consecutive += 1
                    if self.rank == 0:
                        which = f"batch {state.batches}" if first_batch == state.batches else \
                            f"batches {first_batch}-{state.batches}"
                        say(f"non-finite gradients at step {step + 1} ({which}): skipped ({consecutive} in a row, "
                            f"{state.nonfinite_total} in all)")
                    if consecutive >= cfg.max_consecutive_nonfinite:
                        if window.steps:  # the steps before the stop are on record
                            self.flush(window, timer, first=False, quiet=True)
                        raise RunStopped(f"stopping: {consecutive} non-finite losses in a row at step {step + 1}; "
                                         f"last complete checkpoint: {self.last_ckpt}", EXIT_NONFINITE)
                    continue
                consecutive = 0
                state.step = step = step + 1
                self.objective.after_step(engine, step)
                if syncs is not None and step == first_step + 4:
                    self.report_syncs(syncs.stop(), step - 2, step)
                state.videos += self.d.global_batch
                gn = engine.get_global_grad_norm()  # a device tensor under ZeRO: read back with the window
                window.add({"step": step, "lr": lr, "grad_norm": gn.detach() if torch.is_tensor(gn) else gn,
                            "wait": prefetch.wait_s - wait0, "nonfinite_total": state.nonfinite_total,
                            "epoch": (state.videos - 1) // self.videos_per_epoch()}, losses, extras)
                if self.probe is not None and self.probe.due(step):  # before the checkpoint: its records include it
                    window.steps[-1]["probe"] = self.probe.run(engine, self.objective, step)
                if step % cfg.logging.every_steps == 0 or step == self.stop_at or step == first_step:
                    self.flush(window, timer, first=step == first_step)
                if step % cfg.checkpoint.every_steps == 0 or (step == self.stop_at and cfg.checkpoint.at_end):
                    if window.steps:  # records of a checkpointed step are on disk before the checkpoint
                        self.flush(window, timer, first=False, quiet=True)
                    self.save(prefetch)
            if cfg.debug.dump_gathered:
                full = gathered_state(engine)
                if self.rank == 0:
                    torch.save(full, cfg.debug.dump_gathered)
            for line in self.objective.finish(engine, self.run_dir, self.rank, self.world):
                if self.rank == 0:
                    say(line)
            if self.rank == 0:
                say(f"done: {state.step} steps, {state.nonfinite_total} non-finite skipped; "
                    f"last checkpoint {self.last_ckpt}")
            in_step = False
            return 0
        except RunStopped as e:  # raised on every rank alike (agreed by all-reduce)
            in_step = False
            if self.rank == 0:
                say(str(e))
            return e.code
        finally:
            prefetch.close()
            self.metrics.close()
            if self.keys_log is not None:
                self.keys_log.close()
            shutdown(self.loader, synced=not in_step)

    def record_probe(self, result: dict | None, step: int) -> None:
        """A probe outside a step's record (before the first step): its own metrics record."""
        if result is not None and self.rank == 0:
            self.last_probe = dict(result, step=step)
            self.metrics.record({"step": step, "probe": self.last_probe})

    def report_syncs(self, counted: Any, first: int, last: int) -> None:
        if counted is None or self.rank != 0:
            return
        n, steps = sum(counted.values()), last - first + 1
        where = ", ".join(f"{k} x{v}" for k, v in counted.most_common(8)) or "none"
        say(f"host syncs in steps {first}-{last}: {n} ({n / steps:.1f} a step): {where}")

    def flush(self, window: Window, timer: StepTimer, first: bool, quiet: bool = False) -> None:
        """Read the window's values back (the only device sync of the loop), write one record per step and,
        on rank 0, one progress line averaged over the window."""
        read = window.read(self.world)
        times = timer.collect()
        d = self.d
        mem, reserved, mem_kind = peak_memory_gib()
        loader_mem = self.loader_memory()
        recs = []
        for (info, losses, extras), (dt, split) in zip(read, times):
            clips_s = d.samples_per_step / dt
            gn = info["grad_norm"]
            rec = {"step": info["step"], "epoch": info["epoch"], "loss": sum(losses) / len(losses), "lr": info["lr"],
                   "grad_norm": None if gn is None else float(gn), "step_time": dt, "clips_per_s": clips_s,
                   "data_wait": min(1.0, info["wait"] / dt), "peak_mem_gib": mem, "peak_reserved_gib": reserved,
                   "mem_kind": mem_kind, "mfu": self.mfu(clips_s, self.model_flops),
                   "nonfinite_total": info["nonfinite_total"]}
            if self.teacher_flops:
                rec["mfu_with_teacher"] = self.mfu(clips_s, self.model_flops + self.teacher_flops)
            if extras:
                rec["objective"] = extras
            if split:
                rec["step_split"] = split
            if loader_mem is not None:
                rec["loader_mem_gib"] = loader_mem
            if info.get("probe") is not None:
                rec["probe"] = self.last_probe = dict(info["probe"], step=info["step"])
            recs.append(rec)
        if self.cfg.data.kind == "shards" and recs:
            recs[-1].update(self.data_problems())
        for rec in recs:
            self.metrics.record(rec)
        if self.rank == 0 and any("probe" in r for r in recs):
            plot_probe(self.run_dir, self.cfg.name)
        if first and self.rank == 0:
            kern = getattr(self.engine.module, "kernel", None)
            if kern is not None:
                say(f"attention kernel: {kern.used} (requested {kern.requested})")
        if self.rank == 0 and recs and not quiet:
            say(progress_line(self.average(recs), self.stop_at))

    def mfu(self, clips_s: float, flops: float) -> float | None:
        return flops * clips_s / (self.world * self.peak) if flops and self.peak else None

    def average(self, recs: list[dict]) -> dict:
        """The window's progress line: the last step's record with loss, throughput and wait averaged."""
        t = sum(r["step_time"] for r in recs)
        avg = dict(recs[-1], loss=sum(r["loss"] for r in recs) / len(recs),
                   clips_per_s=self.d.samples_per_step * len(recs) / t,
                   data_wait=min(1.0, sum(r["data_wait"] * r["step_time"] for r in recs) / t))
        avg["mfu"] = self.mfu(avg["clips_per_s"], self.model_flops)
        if self.teacher_flops:
            avg["mfu_with_teacher"] = self.mfu(avg["clips_per_s"], self.model_flops + self.teacher_flops)
        if self.last_probe is not None:
            avg["probe"] = self.last_probe
        if "step_split" in recs[-1]:
            avg["step_split"] = {k: sum(r["step_split"].get(k, 0.0) for r in recs) / t for k in recs[-1]["step_split"]}
        if "objective" in recs[-1]:
            names = recs[-1]["objective"]
            avg["objective"] = {k: sum(r["objective"][k] for r in recs) / len(recs) for k in names}
        return avg

    def loader_memory(self) -> float | None:
        fn = getattr(self.loader, "host_memory_bytes", None)
        return fn() / 2**30 if fn is not None else None

    def data_problems(self) -> dict:
        """Skipped clips summed over ranks, and the names of those that crashed or hung a decoder (same steps
        on every rank, so the collectives cannot hang)."""
        st = self.loader.stats()
        bad = torch.tensor([float(st.get("corrupt_samples", 0))])
        dist.all_reduce(bad, group=self.host_group)
        out: dict = {"data_skipped": int(bad.item())}
        mine = {"crashed": list(st.get("crashed", [])), "hung": list(st.get("hung", [])),
                "quarantine": list(st.get("quarantine", [])), "read": read_totals(st)}
        every: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(every, mine, group=self.host_group)
        for kind in ("crashed", "hung"):
            out[f"data_{kind}"] = sorted({k for m in every for k in m[kind]})
        out.update(self.storage.fields([m["read"] for m in every]))
        quarantine = sorted({k for m in every for k in m["quarantine"]})
        if self.rank == 0 and quarantine and quarantine != self.quarantine_written:
            write_quarantine(self.run_dir, quarantine)
            self.quarantine_written = quarantine
        return out


def shutdown(loader: Any, synced: bool) -> None:
    """Stop loader workers, wait for every rank (when all are known to be here), and tear the process
    group down while its threads are alive. The entry point then leaves with os._exit: at interpreter
    exit, a native thread was occasionally destroyed while joinable ('terminate called ...', SIGABRT)."""
    if hasattr(loader, "close"):
        loader.close()
    if dist.is_initialized():
        if synced:
            dist.barrier()
        dist.destroy_process_group()

