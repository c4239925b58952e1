"""One engine, every objective: the same kill -9 + resume test runs for MAE, classification, distillation and
UMT, with no objective-specific code in the test's body (the config sections come from engine_helpers).

Each objective: an uninterrupted run, then a run SIGKILLed after its first checkpoint and resumed with
--resume auto, which must log the same loss at every step (fp32, synthetic data, 2 CPU ranks, ZeRO-3).
"""

from __future__ import annotations

import os
import signal

import pytest
from engine_helpers import metrics, objective_sections, pointer, run, start, wait_for, write_config

pytestmark = pytest.mark.distributed
STEPS = 10


@pytest.mark.parametrize("objective", ["mae", "classify", "distill", "umt"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, objective):
    common = dict(output_dir=str(tmp_path / "runs"), optim={"max_steps": STEPS},
                  checkpoint={"every_steps": 4, "keep_last": 2}, logging={"every_steps": 1, "tensorboard": False},
                  **objective_sections(tmp_path, objective))
    cfg = write_config(tmp_path / "a.yaml", name="a", **common)
    code, log = run("--config", str(cfg), log=tmp_path / "a.log", entry=objective)
    assert code == 0, log[-4000:]
    want = metrics(tmp_path / "runs" / "a")
    assert sorted(want) == list(range(1, STEPS + 1))

    cfg = write_config(tmp_path / "b.yaml", name="b", debug={"step_sleep_s": 0.5}, **common)
    run_dir = tmp_path / "runs" / "b"
    proc = start("--config", str(cfg), log=tmp_path / "b.log", entry=objective)
    try:
        wait_for(lambda: pointer(run_dir) == "step_00000004", 300, "checkpoint step 4", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(metrics(run_dir)) < STEPS, "the run finished before it was killed"
    code, log = run("--config", str(cfg), "--resume", "auto", "debug.step_sleep_s=0", log=tmp_path / "c.log",
                    entry=objective)
    assert code == 0, log[-4000:]
    assert "step_00000004 at step 4" in log
    got = metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == want[s]["loss"], (objective, s, got[s]["loss"], want[s]["loss"])
        assert got[s]["lr"] == want[s]["lr"]
    first, last = want[1]["loss"], want[STEPS]["loss"]
    assert last < first, (objective, first, last)  # it learns on repeated data
