"""The pretraining loop: build (data, model under zero.Init, DeepSpeed engine), resume, train, checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ..data import normalize_on_device
from ..losses import pixel_target, reconstruction_loss
from . import checkpoint as ckpt
from .data_source import batches_per_epoch, build_loader, endless
from .ds_setup import build_engine, gathered_state, resolve_ds_config
from .metrics import (
    PEAK_BF16_FLOPS,
    MetricsWriter,
    detect_device_name,
    model_flops_per_clip,
    peak_memory_gib,
    progress_line,
    say,
)
from .optim import Derived, derive, lr_at
from .preemption import Preemption
from .run_config import RunConfig

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after the checkpoint is safely written


class RunStopped(RuntimeError):
    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.code = code


def share_cpu_threads() -> None:
    """CPU ranks: split the cores between the local ranks unless OMP_NUM_THREADS says otherwise.

    Without this every rank starts one thread per core and they thrash (20x slower on a 2-core box).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def release_cpu_shm_names(rank: int) -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce once every rank has mapped it.

    DeepSpeed never unlinks them: each CPU job would leave 2 x 69 MB in RAM-backed /dev/shm (even after a
    clean exit), and a later job on the same port would open the stale files. The mappings stay valid.
    """
    dist.barrier()  # every rank has opened every segment (that happens inside init_distributed)
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    name.unlink(missing_ok=True)


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; valid before the process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def portable_config(cfg: RunConfig) -> dict:
    """The config as saved in the run folder: output_dir and local shard paths made absolute, so that
    `--config runs/<name>/config.yaml --resume auto` finds the same run and data from any folder."""
    d = cfg.model_dump(mode="json")
    d["output_dir"] = str(Path(cfg.output_dir).resolve())
    shards = (d["data"].get("shards") or {}).get("shards")
    if isinstance(shards, str) and "://" not in shards and not shards.startswith("pipe:") \
            and not Path(shards).is_absolute():
        d["data"]["shards"]["shards"] = str(Path.cwd() / shards)
    return d


def single_process_env() -> bool:
    """Started without a launcher (plain `vmae-pretrain ...`): set up a world of one process on this machine.

    Without RANK / WORLD_SIZE / MASTER_ADDR, DeepSpeed falls back to MPI discovery and fails with an
    mpi4py traceback. Returns True when it filled the variables in.
    """
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")):
        return False
    import socket

    with socket.socket() as s:  # a free port for the one-process rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


def prepare(cfg: RunConfig, loader: Any) -> tuple[Derived, dict]:
    """Derived recipe values + the validated DeepSpeed dict (no process group needed: fails fast)."""
    _, world = world_from_env()
    d = derive(cfg.optim, world_size=world, num_sample=cfg.data.num_sample,
               batches_per_epoch=batches_per_epoch(cfg, loader, world))
    return d, resolve_ds_config(cfg, d)


def train(cfg: RunConfig, resume: str | None) -> int:
    """Run (or resume) pretraining; returns the process exit code."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if single_process_env():
        say("no launcher environment (RANK, WORLD_SIZE): running 1 process; for more, start it with "
            "`deepspeed --num_gpus N --module vmae_ds.pretrain ...`")
    rank, world = world_from_env()
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    if resume in (None, "", "none") and ckpt.read_pointer(ckpt_dir):
        raise RunStopped(f"{run_dir} already holds checkpoints (newest {ckpt.read_pointer(ckpt_dir)}): continue "
                         f"with --resume auto, or pick another name= / delete the folder", 2)
    try:  # before any process group or engine exists: a typo'd path costs seconds, not a ViT-g start-up
        folder = ckpt.resolve_resume(resume, ckpt_dir)
    except FileNotFoundError as e:
        raise RunStopped(f"error: {e}", 2) from None
    loader = build_loader(cfg, rank, world)
    d, ds = prepare(cfg, loader)
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)
    if on_cpu:
        release_cpu_shm_names(rank)
    config_yaml = yaml.safe_dump(portable_config(cfg), sort_keys=False)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        info = {"derived": dataclasses.asdict(d), "deepspeed_config": ds}
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for line in d.lines(cfg.optim.base_lr):
            say(line)
    engine = build_engine(cfg, ds)
    device = engine.device

    state = {"step": 0, "batches": 0, "nonfinite_total": 0}
    if folder is not None:
        client, rank_state = ckpt.load(engine, folder)
        if client["world_size"] != world:
            raise RunStopped(f"{folder} was written by {client['world_size']} ranks, this run has {world}: "
                             f"exact resume needs the same world size", 2)
        changed = resume_conflicts(client.get("config", {}), cfg.model_dump(mode="json"))
        if changed:
            raise RunStopped(f"{folder} was trained with different settings: {', '.join(changed)}; "
                             f"resume with the run's own config (runs/<name>/config.yaml) or start a new run", 2)
        state = dict(client["counters"])
        loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        if rank == 0:
            say(f"resumed from {folder} at step {state['step']}")
            latest = ckpt.read_pointer(ckpt_dir) or ""
            for stale in ckpt_dir.glob("step_*"):  # newer than the pointer = half-written by a killed run
                if stale.name > latest:
                    shutil.rmtree(stale, ignore_errors=True)
    else:
        if rank == 0 and resume == "auto":
            say(f"--resume auto: no complete checkpoint in {ckpt_dir}, starting fresh")
        torch.manual_seed(cfg.seed + rank)
    last_ckpt = str(folder) if folder else "none"

    metrics = MetricsWriter(run_dir, rank == 0, cfg.logging.tensorboard, state["step"])
    flops = model_flops_per_clip(cfg)
    dev_name = cfg.logging.device_name or detect_device_name()
    peak = PEAK_BF16_FLOPS.get(dev_name) if dev_name else None
    if rank == 0 and peak is None:
        say(f"MFU: n/a (no peak-FLOPs entry for device {dev_name or get_accelerator().device_name()})")
    stop_at = min(d.total_steps, cfg.optim.max_steps or d.total_steps)
    state_first_step = state["step"] + 1  # report the kernel that actually ran, once
    preempt = Preemption()
    nan_batches = set(cfg.debug.nan_batches)
    consecutive = 0
    window = {"t": 0.0, "wait": 0.0, "loss": 0.0, "n": 0}

    def save() -> None:
        nonlocal last_ckpt
        client = {"counters": dict(state), "epoch": state["step"] // d.steps_per_epoch, "world_size": world,
                  "config": cfg.model_dump(mode="json"), "loader_rank0": loader.state_dict()}
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state()}
        last_ckpt = str(ckpt.save(engine, ckpt_dir, state["step"], client, rank_state, config_yaml,
                                  cfg.checkpoint.keep_last))

    engine.train()
    stream = endless(loader)  # created after load_state_dict: the loader starts where the checkpoint left it
    in_step = True  # False once every rank is known to leave the loop together (safe to barrier)
    try:
        while state["step"] < stop_at:
            if preempt.agreed(device):
                save()
                raise RunStopped(f"pre-empted (SIGTERM): checkpoint {last_ckpt} written at step {state['step']}; "
                                 f"continue with --resume auto", EXIT_PREEMPTED)
            step = state["step"]
            lr = lr_at(step, d)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            t0, wait, losses = time.perf_counter(), 0.0, []
            while len(losses) < cfg.optim.grad_accum:
                tw = time.perf_counter()
                batch = next(stream)
                # uint8 over the bus, normalise on the device; the target uses fp32 pixels
                video = normalize_on_device(batch["video"].to(device, non_blocking=True))
                enc = batch["encoder_mask"].to(device)
                dec = batch.get("decoder_mask")
                dec = dec.to(device) if dec is not None else None
                wait += time.perf_counter() - tw
                state["batches"] += 1
                target = pixel_target(video, engine.module.patch_size, engine.module.tubelet_size)
                pred = engine(video.to(torch.bfloat16 if cfg.precision == "bf16" else torch.float32), enc, dec)
                loss = reconstruction_loss(pred, target, enc, dec)
                if state["batches"] in nan_batches and rank == 0:
                    loss = loss * float("nan")  # test hook: rank 0 only, so ranks must agree via all_reduce
                # the summed loss: NaN on any rank -> NaN on all, so every rank skips the same batch
                probe = torch.tensor([loss.item()], dtype=torch.float64, device=device)
                dist.all_reduce(probe)
                if not torch.isfinite(probe[0]):
                    # skip: no backward, no step; DeepSpeed's accumulation window simply waits for the next batch
                    state["nonfinite_total"] += 1
                    consecutive += 1
                    if rank == 0:
                        say(f"non-finite loss at step {step + 1} (batch {state['batches']}): skipped "
                            f"({consecutive} in a row, {state['nonfinite_total']} in all)")
                    if consecutive >= cfg.max_consecutive_nonfinite:
                        raise RunStopped(f"stopping: {consecutive} non-finite losses in a row at step {step + 1}; "
                                         f"last complete checkpoint: {last_ckpt}", EXIT_NONFINITE)
                    continue
                consecutive = 0
                engine.backward(loss)
                engine.step()
                losses.append(probe[0].item() / world)
            state["step"] = step = step + 1
            get_accelerator().synchronize()  # GPU work is asynchronous: time the step, not its launch
            dt = time.perf_counter() - t0
            gn = engine.get_global_grad_norm()
            window["t"] += dt
            window["wait"] += wait
            window["loss"] += sum(losses) / len(losses)
            window["n"] += 1
            clips_s = d.samples_per_step / dt
            mem, mem_kind = peak_memory_gib()
            rec = {"step": step, "epoch": (step - 1) // d.steps_per_epoch, "loss": sum(losses) / len(losses),
                   "lr": lr, "grad_norm": float(gn) if gn is not None else None, "step_time": dt,
                   "clips_per_s": clips_s, "data_wait": wait / dt, "peak_mem_gib": mem, "mem_kind": mem_kind,
                   "mfu": flops * clips_s / (world * peak) if flops and peak else None,
                   "nonfinite_total": state["nonfinite_total"]}
            log_now = step % cfg.logging.every_steps == 0 or step == stop_at or step == 1
            if log_now and cfg.data.kind == "shards":  # same steps on every rank: the all-reduce cannot hang
                bad = torch.tensor([float(loader.stats().get("corrupt_samples", 0))], device=device)
                dist.all_reduce(bad)
                rec["data_skipped"] = int(bad.item())
            metrics.record(rec)
            if rank == 0 and step == state_first_step:
                kern = engine.module.kernel
                say(f"attention kernel: {kern.used} (requested {kern.requested})")
            if rank == 0 and log_now:
                w = window
                avg = dict(rec, loss=w["loss"] / w["n"], clips_per_s=d.samples_per_step * w["n"] / w["t"],
                           data_wait=w["wait"] / w["t"])
                avg["mfu"] = flops * avg["clips_per_s"] / (world * peak) if flops and peak else None
                say(progress_line(avg, stop_at))
                window = {"t": 0.0, "wait": 0.0, "loss": 0.0, "n": 0}
            if step % cfg.checkpoint.every_steps == 0 or step == stop_at:
                save()
            if cfg.debug.step_sleep_s:
                time.sleep(cfg.debug.step_sleep_s)
        if cfg.debug.dump_gathered:
            full = gathered_state(engine)
            if rank == 0:
                torch.save(full, cfg.debug.dump_gathered)
        if rank == 0:
            say(f"done: {state['step']} steps, {state['nonfinite_total']} non-finite skipped; "
                f"last checkpoint {last_ckpt}")
        in_step = False
        return 0
    except RunStopped as e:  # raised on every rank alike (agreed by all-reduce)
        in_step = False
        if rank == 0:
            say(str(e))
        return e.code
    finally:
        metrics.close()
        shutdown(loader, synced=not in_step)


# what may change on resume: when to stop, how often to log or save, recompute vs store activations
_RESUME_FREE = {"name", "output_dir", "deepspeed_config", "optim.max_steps", "activation_checkpointing",
                "checkpoint", "logging", "debug", "max_consecutive_nonfinite", "data.shards"}


def resume_conflicts(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between the checkpoint's config and this run's, where a change
    would silently break the schedule or exactness (model, masks, optimiser, seed, data kind/repetition)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = prefix + key
        if dotted in _RESUME_FREE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_conflicts(a, b, dotted + ".")
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            out.append(f"{dotted} {a!r} -> {b!r}")
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
