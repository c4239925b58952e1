"""Helpers for the engine tests: tiny run configs, launching real DeepSpeed ranks on the CPU, reading metrics.

Also a script: `deepspeed --num_gpus 2 tests/engine_helpers.py grads OUT.json` compares ZeRO-3 gradients
with activation checkpointing none / full / selective against a plain single-process model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# 16 videos, 2 per rank per step on 2 ranks -> 4 steps per epoch; 6 epochs = 24 steps.
TINY = {
    "name": "tiny",
    "seed": 0,
    "precision": "fp32",  # exact step-for-step comparison across a resume; bf16 runs the same code path
    "deepspeed_config": str(ROOT / "ds_configs" / "zero3.json"),
    "model": {"name": "vit_tiny_debug", "attention": "sdpa"},
    "masks": {"encoder": "tube", "encoder_ratio": 0.75, "decoder": "running_cell", "decoder_ratio": 0.5},
    "activation_checkpointing": {"mode": "full"},
    "data": {"kind": "synthetic", "num_sample": 2, "synthetic": {"num_videos": 16}},
    "optim": {"batch_size": 2, "base_lr": 0.128, "warmup_epochs": 1, "epochs": 6, "clip_grad": 1.0},
    "checkpoint": {"every_steps": 8, "keep_last": 2},
    "logging": {"every_steps": 4, "tensorboard": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, **sections) -> Path:
    """TINY with sections replaced/merged (one level deep); a section given as None is removed."""
    cfg = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        if v is None:
            cfg.pop(k, None)
        elif isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


ENTRY = {"mae": "vmae_ds.pretrain", "umt": "vmae_ds.pretrain", "classify": "vmae_ds.finetune",
         "distill": "vmae_ds.finetune"}


def launch_cmd(*args: str, script: str | None = None, entry: str = "mae", ranks: int = 2) -> list[str]:
    target = [script] if script else ["--module", ENTRY[entry]]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), *target, *args]


def start(*args: str, log: Path, script: str | None = None, entry: str = "mae",
          ranks: int = 2) -> subprocess.Popen:
    """Launch CPU ranks (2 by default) in a new process group (so the test can kill all of them at once)."""
    f = open(log, "ab")
    return subprocess.Popen(launch_cmd(*args, script=script, entry=entry, ranks=ranks), cwd=ROOT, env=env(),
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def run(*args: str, log: Path, timeout: float = 480, script: str | None = None,
        entry: str = "mae", ranks: int = 2) -> tuple[int, str]:
    p = start(*args, log=log, script=script, entry=entry, ranks=ranks)
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return code, log.read_text(errors="replace")


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step records of metrics.jsonl (the last record wins for a step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def pointer(run_dir: Path) -> str | None:
    p = run_dir / "checkpoints" / "latest_complete"
    return p.read_text().strip() if p.exists() else None


# ---------------------------------------------------------------- script: gradients under checkpointing
def _grads_main(out: str) -> None:
    import deepspeed
    import torch
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.utils import safe_get_full_grad

    from vmae_ds.data import normalize_on_device
    from vmae_ds.engine.ds_setup import load_ds_json
    from vmae_ds.engine.launch import release_cpu_shm_names
    from vmae_ds.losses import pixel_target, reconstruction_loss
    from vmae_ds.masking import TokenGrid, make_masks
    from vmae_ds.models import create_pretrain_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    release_cpu_shm_names(rank)
    ds = load_ds_json(ROOT / "ds_configs" / "zero3.json")
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=8,
              gradient_clipping=0.0, bf16={"enabled": False}, steps_per_print=10**9)
    # the same batch on both ranks: the averaged ZeRO-3 gradient must equal the single-model gradient
    g = torch.Generator().manual_seed(1)
    video = normalize_on_device(torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8, generator=g))
    enc, dec = make_masks("tube", 0.75, "running_cell", 0.5, 4, TokenGrid(2, 4, 4), generator=g)
    target = pixel_target(video, 8, 2)

    torch.manual_seed(0)
    ref = create_pretrain_model("vit_tiny_debug", depth=3, attention="sdpa")
    # ZeRO-3's deepspeed.initialize replaces F.linear for the whole process with its own (matmul, then the
    # bias added: other roundings than addmm); the reference runs the same linear, so equality stays exact
    plain_linear = torch.nn.functional.linear
    torch.nn.functional.linear = zero3_linear_wrap
    try:
        reconstruction_loss(ref(video, enc, dec), target, enc, dec).backward()
    finally:
        torch.nn.functional.linear = plain_linear
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}

    result = {}
    for mode, k in (("none", 0), ("full", 0), ("selective", 2)):
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = create_pretrain_model("vit_tiny_debug", depth=3, attention="sdpa")
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if rank == 0:  # start from the reference weights
                model.load_state_dict(ref.state_dict())
        model.set_activation_checkpointing(mode, k)
        calls = [0, 0]  # forward runs of encoder blocks 0 and 2: 2 per step where recomputed

        def counter(i, calls=calls):
            def hook(*_):
                calls[i] += 1
            return hook
        model.encoder.blocks[0].register_forward_pre_hook(counter(0))
        model.encoder.blocks[2].register_forward_pre_hook(counter(1))
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        loss = reconstruction_loss(engine(video, enc, dec), target, enc, dec)
        engine.backward(loss)
        diffs = {}
        for name, p in engine.module.named_parameters():
            full = safe_get_full_grad(p)
            diffs[name] = float((full.float() - ref_grads[name]).abs().max())
        result[mode] = {"max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                        "num_params": len(diffs), "block_forward_calls": calls,
                        "min_ref_grad_norm": min(float(g.norm()) for g in ref_grads.values())}
        engine.destroy()
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    if len(argv) == 2 and argv[0] == "grads":
        _grads_main(argv[1])


# ---------------------------------------------------------------- one tiny run config per objective
def objective_sections(tmp: Path, objective: str) -> dict:
    """The sections that turn TINY into a run of `objective` (weights files it needs are made in `tmp`)."""
    if objective == "mae":
        return {}
    ft = {"num_classes": 4, "layer_decay": 0.75, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25}
    data = {"kind": "synthetic", "num_sample": 2, "synthetic": {"num_videos": 16, "num_classes": 4}}
    if objective == "classify":
        return {"objective": "classify", "finetune": ft, "data": data, "masks": None}
    if objective == "distill":
        teacher = tmp / "teacher.safetensors"
        if not teacher.exists():
            import torch
            from safetensors.torch import save_file

            from vmae_ds.models import create_classifier
            torch.manual_seed(7)
            save_file(create_classifier("vit_tiny_debug", 4).state_dict(), str(teacher))
        return {"objective": "distill", "finetune": ft, "data": data, "masks": None,
                "distill": {"teacher": {"model": "vit_tiny_debug", "weights": str(teacher)}, "temperature": 2.0,
                            "hard_label_weight": 0.5}}
    if objective == "umt":
        clip = tmp / "clip_tiny.pt"
        if not clip.exists():
            from vmae_ds.models.clip_teacher import random_openai_state_dict, save_openai_state_dict
            save_openai_state_dict(random_openai_state_dict("clip_tiny_debug", seed=1), clip)
        return {"objective": "umt", "masks": None,
                "model": {"name": "vit_tiny_debug", "attention": "sdpa", "num_frames": 8, "tubelet_size": 1},
                "umt": {"teacher": {"name": "clip_tiny_debug", "path": str(clip)}, "align_layers": 2},
                "data": {"kind": "synthetic", "num_sample": 1, "synthetic": {"num_videos": 16}}}
    raise ValueError(objective)
