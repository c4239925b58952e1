"""Non-finite losses in a row stop the run with a clear message; SIGTERM checkpoints before exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import write_shard_with_bad_samples
from engine_helpers import ROOT, metrics, pointer, run, start, wait_for, write_config

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


def _shards(tmp_path) -> Path:
    """16 real H.264 clips in 4 WebDataset shards, via the data CLI."""
    cli = [sys.executable, "-m", "data_tools"]
    steps = [["synth", "--out", str(tmp_path / "videos"), "--n", "16", "--frames", "24", "--size", "48x64"],
             ["manifest", str(tmp_path / "videos"), "--out", str(tmp_path / "videos.jsonl")],
             ["build", "--manifest", str(tmp_path / "videos.jsonl"), "--out", str(tmp_path / "shards"),
              "--shard-size", "4", "--workers", "0", "--quiet"]]
    for args in steps:
        subprocess.run(cli + args, check=True, capture_output=True, cwd=ROOT)
    return tmp_path / "shards" / "index.json"


def _spoil(index: Path) -> None:
    """Put 3 corrupt samples into every shard: the trainer must skip, count and report them."""
    for shard in sorted(index.parent.glob("*.tar")):
        spoiled, _, _ = write_shard_with_bad_samples(shard, shard.with_suffix(".bad"))
        spoiled.replace(shard)


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    # also the one end-to-end run on real video shards (data.kind: shards -> vmae_ds.data)
    # and the corrupt-sample count that reaches the training log
    index = _shards(tmp_path)
    _spoil(index)
    shards = {"shards": str(index), "sampling_rate": 2, "num_workers": 1, "backend": "pyav"}
    cfg = write_config(tmp_path / "c.yaml", name="term", output_dir=str(tmp_path / "runs"),
                       data={"kind": "shards", "shards": shards}, logging={"every_steps": 1},
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
    m = metrics(run_dir)
    last = max(m)
    assert last < 24 and pointer(run_dir) == f"step_{last:08d}"
    # by step 3 each rank has read past its first shard (4 good clips each), so it met that shard's 3 bad ones
    assert m[3]["data_skipped"] >= 6, m[3]
    assert f"corrupt clips skipped {m[3]['data_skipped']}" in log.read_text(errors="replace")
    rank1 = torch.load(run_dir / "checkpoints" / f"step_{last:08d}" / "rank_00001.pt", weights_only=False)
    assert rank1["loader"]["batches"] == last and rank1["loader"]["rank"] == 1  # the shard loader's position
