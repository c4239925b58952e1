"""Process setup shared by every entry point: rank variables, threads, the process group, the run folder."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; valid before the process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def single_process_env() -> bool:
    """Started without a launcher (plain `vmae-pretrain ...`): set up a world of one process on this machine.

    Without RANK / WORLD_SIZE / MASTER_ADDR, DeepSpeed falls back to MPI discovery and fails with an
    mpi4py traceback. Returns True when it filled the variables in.
    """
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")):
        return False
    with socket.socket() as s:  # a free port for the one-process rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


def rank_threads(cpu_count: int, local_ranks: int, loader_workers: int, on_cpu: bool) -> int:
    """Intra-op threads for one rank.

    CPU ranks compute on their share of the cores (every rank starting one thread per core made a 2-core
    box 20x slower). A GPU rank's host work is launches and small ops: a few threads suffice, and the
    cores belong to its decode workers (the default, one thread per core, competes with them).
    """
    share = max(1, cpu_count // max(1, local_ranks))
    if on_cpu:
        return share
    return max(1, min(4, share - loader_workers))


def set_rank_threads(on_cpu: bool, loader_workers: int) -> int:
    """Apply `rank_threads` unless OMP_NUM_THREADS says otherwise; returns the count in effect."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(rank_threads(os.cpu_count() or 1, local_world_size(), loader_workers, on_cpu))
    return torch.get_num_threads()


def release_cpu_shm_names(rank: int) -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce once every rank has mapped it.

    DeepSpeed never unlinks them: each CPU job would leave 2 x 69 MB in RAM-backed /dev/shm (even after a
    clean exit), and a later job on the same port would open the stale files. The mappings stay valid.
    """
    dist.barrier()  # every rank has opened every segment (that happens inside init_distributed)
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    name.unlink(missing_ok=True)


def quiet_library_warnings() -> None:
    """Silence warnings our users cannot act on that would otherwise repeat every step (DeepSpeed's ZeRO-3 calls
    a torch collective that torch 2.14 marks deprecated; something in the step resets the once-per-line
    registry, so the default filter prints it again each time)."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
                            category=FutureWarning)


def init_process_group(on_cpu: bool) -> Any:
    """DeepSpeed's process group (gloo on CPU ranks) plus a gloo group for host-side agreement.

    Agreeing on a flag (pre-emption) over gloo costs no device sync; over NCCL it would wait for the GPU.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, verbose=False)
    if on_cpu:
        release_cpu_shm_names(dist.get_rank())
        return None  # the default group already is gloo
    return dist.new_group(backend="gloo")


def portable_config(cfg: Any) -> dict:
    """The config as saved in the run folder: output_dir and local shard paths made absolute, so that
    `--config runs/<name>/config.yaml --resume auto` finds the same run and data from any folder."""
    from .run_config import OBJECTIVE_SECTIONS

    d = cfg.model_dump(mode="json")
    for section in ("masks", "umt", "finetune", "distill"):  # another objective's section would not validate
        if section not in OBJECTIVE_SECTIONS[cfg.objective]:
            d.pop(section, None)
    d["output_dir"] = str(Path(cfg.output_dir).resolve())

    def absolute(path: Any) -> Any:
        local = isinstance(path, str) and "://" not in path and not path.startswith("pipe:")
        return str(Path.cwd() / path) if local and not Path(path).is_absolute() else path

    # every field that names a local file or folder, as (section path, key)
    fields = [(("data", "shards"), "shards"), (("finetune",), "init"), (("finetune", "eval"), "shards"),
              (("finetune", "init_head_map"), "source_classes"), (("finetune", "init_head_map"), "target_classes"),
              (("distill", "teacher"), "weights"), (("umt", "teacher"), "path"), (("probe",), "train_shards"),
              (("probe",), "val_shards")]
    for where, key in fields:
        node: Any = d
        for part in where:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key):
            node[key] = absolute(node[key])
    return d


def inference_setup(dtype_name: str | None) -> tuple[int, int, torch.device, torch.dtype]:
    """For the inference tools (vmae-eval, vmae-extract): (rank, world, device, dtype) from the launcher's
    variables (one process without them), the process group when there are several ranks, and bf16 on a GPU /
    fp32 on the CPU unless `dtype_name` says otherwise."""
    rank, world = world_from_env()
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name or ("bf16" if cuda else "fp32")]
    return rank, world, device, dtype
