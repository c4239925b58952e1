"""`speed.compile` (torch.compile of every transformer block) under the real engine: ZeRO-2, bf16, every block
checkpointed, one CPU rank; it trains the same as the eager blocks (a speed option changes no result beyond
kernel rounding)."""

from __future__ import annotations

import pytest
from engine_helpers import ROOT, metrics, run, write_config

pytestmark = pytest.mark.distributed


def test_compiled_blocks_train_like_eager_ones(tmp_path):
    losses = {}
    for compiled in (False, True):
        name = f"c{int(compiled)}"
        cfg = write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"), precision="bf16",
                           deepspeed_config=str(ROOT / "ds_configs" / "zero2.json"), speed={"compile": compiled},
                           debug={"sync_report": not compiled},
                           optim={"max_steps": 4}, logging={"every_steps": 2, "tensorboard": False},
                           checkpoint={"every_steps": 100, "at_end": False})
        code, log = run("--config", str(cfg), log=tmp_path / f"{name}.log", ranks=1, timeout=600)
        assert code == 0, log[-3000:]
        assert ("torch.compile: 3 transformer blocks" in log) == compiled  # debug model: 2 encoder + 1 decoder
        # the sync counter is CUDA-only, and says so instead of printing a count of zero
        assert ("debug.sync_report: counts CUDA syncs only" in log) == (not compiled)
        losses[compiled] = [metrics(tmp_path / "runs" / name)[s]["loss"] for s in range(1, 5)]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2), losses
