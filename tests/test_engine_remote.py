"""Training on shards served over HTTP, with a stalled read, a 503, a cut connection and a shard that is always
404: 2 CPU ranks x 2 loader workers give the same losses as the same run on the local folder (where that shard
is absent), the lost shard is named and counted in the progress line and metrics.jsonl, reads are reported per
rank, and a kill -9 followed by `--resume auto` changes no loss."""

from __future__ import annotations

import os
import signal

import pytest
from data_helpers import all_keys, sized_shards
from engine_helpers import metrics, pointer, run, start, wait_for, write_config
from shard_server import ShardServer
from test_data_remote import GONE, NAMES, keys_in, without
from test_engine_elastic import consumed

pytestmark = pytest.mark.distributed

STEPS = 12  # 11 steps an epoch (22 clips, 2 ranks, 1 clip a step), so the run crosses into epoch 1


def config(tmp_path, name: str, shards: str, **extra):
    data = {"kind": "shards", "num_sample": 1,
            "shards": {"shards": shards, "sampling_rate": 2, "num_workers": 2, "shuffle_block": 4,
                       "read_timeout_s": 2, "read_retries": 2, "retry_backoff_s": 0.05}}
    return write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"), data=data,
                        optim={"batch_size": 1, "epochs": 2, "max_steps": STEPS}, checkpoint={"every_steps": 4},
                        logging={"every_steps": 1, "tensorboard": False}, **extra)


def test_http_run_with_faults_equals_the_local_run_and_survives_kill_9(tmp_path_factory, tmp_path):
    folder = sized_shards(tmp_path_factory)
    local = without(folder, tmp_path, GONE)
    cfg = config(tmp_path, "local", str(local / "index.json"), debug={"log_keys": True})
    code, log = run("--config", str(cfg), log=tmp_path / "local.log")
    assert code == 0, log[-3000:]
    want = metrics(tmp_path / "runs" / "local")
    got_keys = consumed(tmp_path / "runs" / "local")
    reachable = all_keys() - keys_in(GONE)
    # 24 clips consumed: all 21 reachable ones of epoch 0, then 3 of epoch 1
    assert sum(got_keys.values()) == 2 * STEPS and all(got_keys[k] >= 1 for k in reachable)
    assert not set(got_keys) - set(reachable)

    faults = {NAMES[0]: ["stall"], NAMES[1]: ["503"], NAMES[2]: ["cut"]}
    with ShardServer(folder, faults=faults, gone={GONE}) as srv:
        cfg = config(tmp_path, "http", f"{srv.url}/index.json", debug={"step_sleep_s": 0.3})
        run_dir = tmp_path / "runs" / "http"
        proc = start("--config", str(cfg), log=tmp_path / "killed.log")
        try:
            wait_for(lambda: pointer(run_dir) == "step_00000004", 300, "checkpoint step 4", proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        killed_at = max(metrics(run_dir))
        assert killed_at < STEPS, "the run finished before it was killed"
        code, log = run("--config", str(cfg), "--resume", "auto", "debug.step_sleep_s=0", log=tmp_path / "http.log")
        assert code == 0, log[-3000:]
        assert len(srv.requests(GONE)) >= 3 and all(s == 404 for _, s in srv.requests(GONE))
    assert "step_00000004 at step 4" in log
    got = metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
    last = got[STEPS]
    assert last["data_unreachable"] == {GONE: last["data_unreachable"][GONE]} and last["data_missing"] >= 1
    assert len(last["data_read_mb"]) == 2 and all(mb > 0 for mb in last["data_read_mb"])
    assert len(last["data_read_mb_s"]) == 2 and len(last["data_read_retries"]) == 2
    assert f"unreachable shards 1: {GONE} (" in log and "MB/s a rank (slowest rank" in log
    # named where it was read: before the kill or after the resume, whichever reached it (the loader runs ahead)
    both = (tmp_path / "killed.log").read_text() + log
    assert f"shard {GONE}: ShardUnreachable: unreachable after 3 tries (last: HTTP 404 Not Found)" in both
