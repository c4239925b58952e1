"""Non-finite losses in a row stop the run with a clear message; SIGTERM checkpoints before exiting."""

from __future__ import annotations

import os
import signal

import pytest
from engine_helpers import metrics, pointer, run, start, wait_for, write_config

pytestmark = pytest.mark.distributed


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", name="nan", output_dir=str(tmp_path / "runs"),
                       max_consecutive_nonfinite=3, debug={"nan_batches": [4, 5, 6]},
                       checkpoint={"every_steps": 2}, optim={"max_steps": 10})
    code, log = run("--config", str(cfg), log=tmp_path / "log.txt")
    assert code != 0
    ckpt = tmp_path / "runs" / "nan" / "checkpoints" / "step_00000002"
    assert f"stopping: 3 non-finite losses in a row at step 4; last complete checkpoint: {ckpt}" in log
    assert max(metrics(tmp_path / "runs" / "nan")) == 3


def _group_alive(pgid: int, proc) -> bool:
    proc.poll()  # reap the launcher: a zombie still counts as a member of the group
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", name="term", output_dir=str(tmp_path / "runs"),
                       debug={"step_sleep_s": 0.3}, checkpoint={"every_steps": 1000})
    run_dir = tmp_path / "runs" / "term"
    log = tmp_path / "log.txt"
    proc = start("--config", str(cfg), log=log)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and max(metrics(run_dir), default=0) >= 3, 300,
                 "step 3", proc)
        os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does to the whole job on pre-emption
        wait_for(lambda: "pre-empted (SIGTERM)" in log.read_text(errors="replace"), 120, "the pre-emption save")
        wait_for(lambda: not _group_alive(proc.pid, proc), 60, "every process of the job to exit")
    finally:
        if _group_alive(proc.pid, proc):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    last = max(metrics(run_dir))
    assert last < 24 and pointer(run_dir) == f"step_{last:08d}"
    assert (run_dir / "checkpoints" / f"step_{last:08d}" / "rank_00001.pt").exists()
