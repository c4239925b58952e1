"""Real 2-rank DeepSpeed ZeRO-3 runs on the CPU (gloo) with activation checkpointing.

One uninterrupted run is shared by several tests; a second run is SIGKILLed after a checkpoint and resumed,
and must reproduce the first run's loss at every step (fp32, deterministic synthetic data).
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import yaml
from engine_helpers import metrics, pointer, run, start, wait_for, write_config

from vmae_ds.engine.resume import resume_conflicts
from vmae_ds.engine.run_config import RunConfig

pytestmark = pytest.mark.distributed

STEPS = 24
NAN_BATCH = 6  # rank 0's loss is NaN at the 6th batch drawn: skipped and counted, identically in both runs


def _cfg(tmp, name, **extra):
    debug = {"nan_batches": [NAN_BATCH], **extra.pop("debug", {})}
    return write_config(tmp / f"{name}.yaml", name=name, output_dir=str(tmp / "runs"), debug=debug, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    cfg = _cfg(tmp, "uninterrupted", debug={"dump_gathered": str(tmp / "gathered.pt")})
    code, log = run("--config", str(cfg), log=tmp / "uninterrupted.log")
    assert code == 0, log[-4000:]
    return tmp, tmp / "runs" / "uninterrupted", log


def test_derived_values_printed(base):
    _, _, log = base
    assert "base lr 0.128 -> actual lr 0.002 (= base * 4 / 256)" in log
    assert "world size 2, global batch 4 videos (8 samples/step after num_sample, micro batch 4/GPU)" in log
    assert "steps per epoch 4, total steps 24, warmup steps 4" in log
    assert log.count("attention kernel: sdpa (requested sdpa)") == 1  # what actually ran, reported once


def test_loss_falls_on_repeated_data(base):
    _, run_dir, _ = base
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, STEPS + 1))
    first = sum(m[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(m[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.05, (first, last)


def test_metrics_fields_and_progress_line(base):
    _, run_dir, log = base
    rec = metrics(run_dir)[STEPS]
    assert rec["lr"] > 0 and rec["grad_norm"] > 0 and rec["clips_per_s"] > 0 and 0 <= rec["data_wait"] < 1
    assert rec["mfu"] is None  # CPU: no peak-FLOPs entry
    assert f"step {STEPS}/{STEPS} ep 5 | loss" in log and "clips/s | MFU n/a | peak mem" in log
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())


def test_nonfinite_loss_skipped_and_counted(base):
    _, run_dir, log = base
    m = metrics(run_dir)
    # batches 1-5 made steps 1-5; batch 6 (step 6's first try) is dropped and batch 7 makes step 6
    assert m[5]["nonfinite_total"] == 0 and m[6]["nonfinite_total"] == 1 and m[STEPS]["nonfinite_total"] == 1
    assert f"non-finite gradients at step 6 (batch {NAN_BATCH}): skipped (1 in a row, 1 in all)" in log
    assert all(math.isfinite(r["loss"]) for r in m.values())


def test_checkpoints_keep_last_k_with_config(base):
    _, run_dir, _ = base
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000016", "step_00000024"]
    assert pointer(run_dir) == "step_00000024"
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert cfg.name == "uninterrupted" and cfg.activation_checkpointing.mode == "full"
    assert (ck / "step_00000024" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    client = torch.load(ck / "step_00000024" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert client["counters"]["step"] == STEPS and client["epoch"] == 6 and client["config"]["name"] == "uninterrupted"
    rank1 = torch.load(ck / "step_00000024" / "rank_00001.pt", weights_only=False)
    assert rank1["loader"] == {"index": STEPS + 1}  # one batch more than steps: the skipped one
    assert set(rank1["rng"]) >= {"torch", "numpy", "python"}


def test_export_equals_gathered_zero3_params(base):
    from safetensors.torch import load_file

    from vmae_ds.export import main as export_main
    from vmae_ds.models import create_pretrain_model, load_pretrained

    tmp, run_dir, _ = base
    out = tmp / "export.safetensors"
    assert export_main([str(run_dir), str(out)]) == 0
    exported = load_file(str(out))
    gathered = torch.load(tmp / "gathered.pt")
    assert set(exported) == set(gathered) and len(gathered) == 49
    for k, v in gathered.items():
        assert exported[k].dtype == torch.float32 and torch.equal(exported[k], v), k
    model = create_pretrain_model("vit_tiny_debug")
    assert load_pretrained(model, out).loaded == 49


def test_sigkill_then_resume_matches_uninterrupted(base):
    tmp, base_dir, _ = base
    cfg = _cfg(tmp, "killed", debug={"step_sleep_s": 0.4})  # slow enough to be killed mid-run
    run_dir = tmp / "runs" / "killed"
    proc = start("--config", str(cfg), log=tmp / "killed.log")
    try:
        wait_for(lambda: pointer(run_dir) == "step_00000008", 300, "checkpoint step 8", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(metrics(run_dir))
    assert killed_at < STEPS, "the run finished before it was killed"
    code, log = run("--config", str(cfg), "--resume", "auto", "debug.step_sleep_s=0", log=tmp / "resumed.log")
    assert code == 0, log[-4000:]
    assert "resumed from" in log and "step_00000008 at step 8" in log
    want, got = metrics(base_dir), metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
        assert got[s]["lr"] == want[s]["lr"] and got[s]["nonfinite_total"] == want[s]["nonfinite_total"]


def test_resume_refuses_changed_training_settings(base):
    tmp, base_dir, _ = base
    before = sorted((base_dir / "checkpoints").glob("step_*"))
    cfg = _cfg(tmp, "uninterrupted")  # same run folder, then a changed batch size on the command line
    code, log = run("--config", str(cfg), "--resume", "auto", "optim.batch_size=4", log=tmp / "changed.log")
    assert code == 2, log[-4000:]
    assert "was trained with different settings: optim.batch_size 2 -> 4" in log
    assert sorted((base_dir / "checkpoints").glob("step_*")) == before  # nothing written


def test_resume_conflicts_lists_only_settings_that_matter():
    saved = RunConfig().model_dump(mode="json")
    same = RunConfig.model_validate({"optim": {"max_steps": 5}, "logging": {"every_steps": 1},
                                     "activation_checkpointing": {"mode": "full"}}).model_dump(mode="json")
    assert resume_conflicts(saved, same) == []
    changed = RunConfig.model_validate({"seed": 1, "masks": {"decoder": "none"}}).model_dump(mode="json")
    assert resume_conflicts(saved, changed) == ["masks.decoder 'running_cell' -> 'none'", "seed 0 -> 1"]
