"""The host-sync-free training step gives bit-identical losses on the CPU to the step it replaced
(tests/reference_step.py: boolean-mask indexing, per-call constants, loss.item() + all-reduce per micro-step),
with a non-finite batch skipped on every rank, and with gradient accumulation."""

from __future__ import annotations

import json

import pytest
from engine_helpers import ROOT, metrics, run, write_config

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("accum,nan", [(1, [3]), (2, [])])
def test_sync_free_step_matches_the_old_step_bit_for_bit(tmp_path, accum, nan):
    cfg = write_config(tmp_path / "c.yaml", name="s", output_dir=str(tmp_path / "runs"),
                       optim={"max_steps": 8, "grad_accum": accum}, debug={"nan_batches": nan},
                       logging={"every_steps": 4, "tensorboard": False})
    code, log = run("--config", str(cfg), log=tmp_path / "engine.log")
    assert code == 0, log[-3000:]
    got = metrics(tmp_path / "runs" / "s")
    code, log = run(str(cfg), str(tmp_path / "ref.json"), log=tmp_path / "ref.log",
                    script=str(ROOT / "tests" / "reference_step.py"))
    assert code == 0, log[-3000:]
    want = {int(k): v for k, v in json.loads((tmp_path / "ref.json").read_text()).items()}
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for s in want:
        assert got[s]["loss"] == want[s], (s, got[s]["loss"], want[s])
    if nan:
        assert got[8]["nonfinite_total"] == 1
