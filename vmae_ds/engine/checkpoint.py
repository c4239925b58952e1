"""Sharded DeepSpeed checkpoints with our own completion pointer.

Layout: <run>/checkpoints/step_00000100/ (DeepSpeed's files + rank_XXXXX.pt per rank + config.yaml),
and <run>/checkpoints/latest_complete naming the newest checkpoint that every rank finished writing.
DeepSpeed's own `latest` file can be written before all ranks are done, so resume never reads it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

POINTER = "latest_complete"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of it (also after a crash: fsync'd)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new pointer, never half


META = "meta.json"
UNIVERSAL = "universal"  # <checkpoints>/universal/<tag>/: a checkpoint converted for another world size


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, config_yaml: str,
         keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint folder."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    folder = ckpt_dir / tag
    folder.mkdir(parents=True, exist_ok=True)  # ranks that wrote no DeepSpeed file here still need it
    rank = dist.get_rank()
    torch.save(rank_state, folder / f"rank_{rank:05d}.pt")
    if rank == 0:
        (folder / "config.yaml").write_text(config_yaml)
        meta = {k: client_state[k] for k in ("world_size", "counters", "global_batch") if k in client_state}
        meta["zero_stage"] = engine.zero_optimization_stage()
        write_atomic(folder / META, json.dumps(meta) + "\n")
    dist.barrier()  # all ranks' shards are on disk before the pointer moves
    if rank == 0:
        write_atomic(ckpt_dir / POINTER, tag + "\n")
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return folder


def read_meta(folder: Path) -> dict:
    """A checkpoint's world size, counters and ZeRO stage without loading any tensor (older checkpoints without
    meta.json: the world size from their rank files)."""
    try:
        return json.loads((folder / META).read_text())
    except FileNotFoundError:
        return {"world_size": len(list(folder.glob("rank_*.pt")))}


def rank_states(folder: Path) -> list[dict]:
    """Every rank's state file of a checkpoint (loader positions, RNG): for a resume on another world size."""
    files = sorted(folder.glob("rank_*.pt"))
    return [torch.load(f, weights_only=False) for f in files]


def universal_copy(folder: Path, rank: int) -> Path:
    """Convert `folder` with DeepSpeed's universal-checkpoint tool (ZeRO-1/2/3 shards -> one file per parameter
    with its optimizer moments), once, on rank 0; every rank then loads it with `load_universal`. Collective."""
    out = folder.parent / UNIVERSAL / folder.name
    if rank == 0 and not (out / "done").exists():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        to_universal(argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=2,
                                        num_merge_workers=2, keep_temp_folder=False, strict=True,
                                        inject_missing_state=True))
        (out / "done").write_text("")
    dist.barrier()
    return out


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags up to (and including) the pointer, oldest first."""
    latest = read_pointer(ckpt_dir)
    if latest is None:
        return []
    return sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= latest)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never an in-progress one), and universal
    copies of checkpoints that are gone."""
    for tag in complete_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for copy in (ckpt_dir / UNIVERSAL).glob("step_*"):
        if not (ckpt_dir / copy.name).is_dir():
            shutil.rmtree(copy, ignore_errors=True)


def read_pointer(ckpt_dir: Path) -> str | None:
    try:
        tag = (ckpt_dir / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    return tag if (ckpt_dir / tag).is_dir() else None


def resolve_resume(arg: str | None, ckpt_dir: Path) -> Path | None:
    """--resume: none -> None; auto -> newest complete checkpoint or None; else a checkpoint folder."""
    if arg in (None, "", "none"):
        return None
    if arg == "auto":
        tag = read_pointer(ckpt_dir)
        return ckpt_dir / tag if tag else None
    path = Path(arg)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {arg}: no such checkpoint folder (give auto, none, or "
                                f"{ckpt_dir}/step_XXXXXXXX)")
    if read_pointer(path / "checkpoints") or read_pointer(path):  # a run folder or its checkpoints/ folder
        raise FileNotFoundError(f"--resume {arg}: a run folder, not one checkpoint: use --resume auto "
                                f"(with name= / output_dir= of that run) or pick one of its step_* folders")
    return path


def load(engine: Any, folder: Path, universal: Path | None = None) -> tuple[dict, dict | None]:
    """Collective. Restores model/optimizer; returns (client_state, this rank's state). With `universal` (the
    converted copy, for another world size) the model and optimizer come from it and the rank state is None."""
    src = universal if universal is not None else folder
    _, client = engine.load_checkpoint(str(src.parent), tag=src.name)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {src}")
    if universal is not None:
        return client, None
    rank_file = folder / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.exists():
        raise RuntimeError(f"{rank_file} missing: was the checkpoint written with a different world size?")
    rank_state = torch.load(rank_file, weights_only=False)
    return client, rank_state
