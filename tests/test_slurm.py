"""The SLURM launch on two "nodes" of this machine: scripts/train_slurm.sbatch under stand-ins for srun and
scontrol (tests/slurm_standin) that start one task per node with SLURM's variables, kill a task's leftover
processes when its main process exits, and deliver the time-limit SIGTERM to every process of the step."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from engine_helpers import ROOT, free_port, metrics, pointer, wait_for, write_config

pytestmark = pytest.mark.distributed
STANDIN = ROOT / "tests" / "slurm_standin"


def sbatch(cfg: Path, tmp: Path, *overrides: str, job: int = 4242) -> subprocess.Popen:
    """What `sbatch --nodes=2 --ntasks-per-node=1 scripts/train_slurm.sbatch CFG` runs on the first node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(PATH=f"{STANDIN}:{env['PATH']}", SLURM_JOB_ID=str(job), SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1(x2)", SLURM_JOB_NODELIST="node[001-002]",
               SLURM_SUBMIT_DIR=str(ROOT), MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", STANDIN_LOG=str(tmp / "standin.log"),
               PY=str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python")
    log = open(tmp / f"job{job}.out", "ab")
    return subprocess.Popen(["bash", str(ROOT / "scripts" / "train_slurm.sbatch"), str(cfg), *overrides],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def test_two_nodes_reach_the_last_step(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", name="two", output_dir=str(tmp_path / "runs"),
                       optim={"max_steps": 6}, logging={"every_steps": 2, "tensorboard": False})
    code = finish(sbatch(cfg, tmp_path))
    out = (tmp_path / "job4242.out").read_text(errors="replace")
    assert code == 0, out[-3000:]
    assert "world size 2," in out and "done: 6 steps" in out
    assert "srun exit codes [0, 0]" in (tmp_path / "standin.log").read_text()
    assert sorted(metrics(tmp_path / "runs" / "two")) == list(range(1, 7))


def test_time_limit_sigterm_saves_the_step_in_progress_and_the_requeued_job_finishes(tmp_path):
    from test_engine_robustness import _shards

    index = _shards(tmp_path)  # real shards, so loader workers are part of the step and get the TERM too
    shards = {"shards": str(index), "sampling_rate": 2, "num_workers": 1, "backend": "pyav"}
    # step 3 takes 35 s: longer than DeepSpeed's launcher waits before it SIGKILLs its ranks
    cfg = write_config(tmp_path / "c.yaml", name="pre", output_dir=str(tmp_path / "runs"),
                       data={"kind": "shards", "shards": shards}, optim={"max_steps": 6},
                       logging={"every_steps": 1, "tensorboard": False}, checkpoint={"every_steps": 1000},
                       debug={"step_sleep_s": 35, "sleep_steps": [3]})
    run_dir = tmp_path / "runs" / "pre"
    job = sbatch(cfg, tmp_path)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and max(metrics(run_dir), default=0) >= 2, 240,
                 "step 2", job)
        time.sleep(3)  # inside step 3's 35 s
        srun = subprocess.run(["pgrep", "-f", "-s", str(job.pid), "slurm_standin/srun"], capture_output=True,
                              text=True).stdout.split()
        assert len(srun) == 1, srun
        os.kill(int(srun[0]), signal.SIGUSR1)  # the time limit: TERM to every process of the step
        code = finish(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = (tmp_path / "job4242.out").read_text(errors="replace")
    assert code == 143, out[-3000:]
    assert pointer(run_dir) == "step_00000003", out[-3000:]  # the step that was running when TERM came
    assert "pre-empted (SIGTERM): checkpoint" in out and "requeueing job 4242" in out
    log = (tmp_path / "standin.log").read_text()
    assert "srun exit codes [143, 143]" in log and "requeue 4242" in log
    assert max(metrics(run_dir)) == 3

    code = finish(sbatch(cfg, tmp_path))  # the requeued job: same script, same config
    out = (tmp_path / "job4242.out").read_text(errors="replace")
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "step_00000003 at step 3" in out and "done: 6 steps" in out
    assert sorted(metrics(run_dir)) == list(range(1, 7))
