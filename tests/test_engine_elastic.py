"""Resume on another number of ranks: a run checkpointed on 2 ranks continues on 1 (ZeRO-3), and one on 1
continues on 2 (ZeRO-2). The ZeRO states go through DeepSpeed's universal checkpoint, the lr schedule continues
by videos seen, and the loader re-deals the rest of the epoch: over the two runs every clip of the interrupted
epoch (shards of 7, 3, 11 and 1 clips) is consumed exactly once."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from data_helpers import all_keys, uneven_shards
from engine_helpers import ROOT, metrics, run, write_config

pytestmark = pytest.mark.distributed


def consumed(run_dir) -> Counter:
    out: Counter = Counter()
    for f in run_dir.glob("keys.rank*.jsonl"):
        for line in f.read_text().splitlines():
            out.update(json.loads(line)["keys"])
    return out


@pytest.mark.parametrize("before,after,stage", [(2, 1, "zero3"), (1, 2, "zero2")])
def test_resume_on_another_world_size_keeps_every_clip_of_the_epoch_once(tmp_path_factory, tmp_path, before,
                                                                         after, stage):
    shards = uneven_shards(tmp_path_factory)  # 22 clips
    data = {"kind": "shards", "num_sample": 1,
            "shards": {"shards": str(shards), "sampling_rate": 2, "num_workers": 2, "shuffle_block": 4}}
    first = 10 // before  # 10 clips on the old world size, then the other 12 of the epoch
    cfg = write_config(tmp_path / "c.yaml", name="el", output_dir=str(tmp_path / "runs"), data=data,
                       deepspeed_config=str(ROOT / "ds_configs" / f"{stage}.json"),
                       optim={"batch_size": 1, "epochs": 3, "max_steps": first},
                       checkpoint={"every_steps": 100}, logging={"every_steps": 1, "tensorboard": False},
                       debug={"log_keys": True})
    code, log = run("--config", str(cfg), log=tmp_path / "a.log", ranks=before)
    assert code == 0, log[-3000:]
    run_dir = tmp_path / "runs" / "el"
    assert sum(consumed(run_dir).values()) == 10
    lr_before = metrics(run_dir)[first]["lr"]

    code, log = run("--config", str(cfg), "--resume", "auto", f"optim.max_steps={first + 12 // after}",
                    log=tmp_path / "b.log", ranks=after)
    assert code == 0, log[-3000:]
    assert f"elastic resume: world size {before} -> {after}, global batch {before} -> {after} videos" in log
    assert "universal" in log and f"loader: resuming {before} rank(s)" in log
    got = consumed(run_dir)
    assert got == all_keys(), (got - all_keys(), all_keys() - got)  # none missing, none twice
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, first + 12 // after + 1))
    # the schedule continues by videos seen (warmup over the first epoch, 22 videos, then cosine): its position
    # carries on; the peak follows the linear rule, so it scales with the global batch (1 clip per rank)
    assert m[first + 1]["lr"] / after > lr_before / before > 0
    assert all(r["loss"] == r["loss"] for r in m.values())  # finite throughout


def test_synthetic_data_on_another_world_size_is_refused_in_one_line_before_any_conversion(tmp_path):
    """Only the shard loader can re-deal an epoch: a synthetic run resumed on another world size stops at once,
    naming the checkpoint and both world sizes (it used to crash after DeepSpeed's universal conversion)."""
    cfg = write_config(tmp_path / "c.yaml", name="syn", output_dir=str(tmp_path / "runs"),
                       optim={"max_steps": 2}, checkpoint={"every_steps": 2}, logging={"every_steps": 1})
    code, log = run("--config", str(cfg), log=tmp_path / "a.log", ranks=2)
    assert code == 0, log[-3000:]
    code, log = run("--config", str(cfg), "--resume", "auto", log=tmp_path / "b.log", ranks=1)
    assert code == 2, log[-3000:]
    assert "was written by 2 rank(s), this start has 1: data.kind synthetic cannot be re-dealt" in log, log[-3000:]
    assert not (tmp_path / "runs" / "syn" / "checkpoints" / "universal").exists(), "converted before refusing"
