"""The next batch is prepared off the training thread, and DeepSpeed's per-bucket synchronize is off where nothing
overlaps (world size 1): neither changes a result.

- BatchPrefetcher alone: a fetch that sleeps overlaps the consumer's work, and `state_dict()` is the position of
  the next batch to consume while its fetch is in flight (what exact resume needs).
- Two single-process ZeRO-2 runs of the engine: one with overlap_comm forced on and a loader that sleeps 0.6 s in
  every fetch, one with the defaults (overlap_comm auto -> off at world size 1, no sleep). The parameters after
  the last step are bit-equal, and the sleeping loader does not lengthen the step (it would by 0.6 s if the batch
  were prepared on the training thread, as it was between backward and the optimizer step).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import torch
from engine_helpers import ROOT, env, metrics, write_config

from vmae_ds.engine.prefetch import BatchPrefetcher


class _SlowSource:
    """Batches {x: i} after `delay` seconds each; its state is the index of the next batch."""

    def __init__(self, delay: float):
        self.delay, self.i = delay, 0
        self.threads: set[str] = set()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        batch = {"x": torch.tensor([self.i]), "keys": [f"k{self.i}"]}
        self.i += 1
        return batch

    def state(self) -> dict:
        return {"next": self.i}


def test_prefetcher_overlaps_fetch_with_work_and_keeps_the_position():
    src = _SlowSource(delay=0.2)
    pf = BatchPrefetcher(src, lambda b: {"x": b["x"] * 10}, torch.device("cpu"), src.state)
    try:
        assert pf.state_dict() == {"next": 0}
        pf.start()
        got, t0 = [], time.perf_counter()
        for step in range(6):
            batch = pf.next()
            got.append(int(batch["x"]))
            assert pf.last_keys == [f"k{step}"]
            # the fetch of batch step+1 is in flight: a checkpoint now must resume at it
            assert pf.state_dict() == {"next": step + 1}
            time.sleep(0.3)  # the step's compute
        elapsed = time.perf_counter() - t0
    finally:
        pf.close()
    assert got == [0, 10, 20, 30, 40, 50]
    assert src.threads and all(n.startswith("vmae-prefetch") for n in src.threads), src.threads
    # serial would be 6 x (0.2 + 0.3) = 3.0 s; overlapped, only the first fetch is waited for
    assert elapsed < 6 * 0.3 + 0.2 + 0.4, elapsed
    assert pf.wait_s < 0.2 + 0.15, pf.wait_s


def test_prefetcher_stops_fetching_when_told_and_raises_loader_errors_on_the_caller():
    class Boom:
        def __init__(self):
            self.n = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.n += 1
            if self.n == 2:
                raise RuntimeError("data: shard x.tar: unreadable")
            return {"x": torch.zeros(1)}

    src = Boom()
    pf = BatchPrefetcher(src, lambda b: b, torch.device("cpu"), lambda: {"n": src.n})
    try:
        pf.next(fetch_following=False)  # as after SIGTERM: nothing more is drawn
        time.sleep(0.1)
        assert src.n == 1 and pf.state_dict() == {"n": 1}
        try:
            pf.next()
        except RuntimeError as e:
            assert "x.tar" in str(e)
        else:
            raise AssertionError("the loader's error was not raised on the training thread")
    finally:
        pf.close()


STEPS = 6
STEP_SLEEP, FETCH_SLEEP = 0.8, 0.6


def _single(tmp, name: str, **sections) -> tuple:
    cfg = write_config(tmp / f"{name}.yaml", name=name, output_dir=str(tmp / "runs"),
                       deepspeed_config=str(ROOT / "ds_configs" / "zero2.json"),
                       optim={"max_steps": STEPS}, checkpoint={"every_steps": 1000, "at_end": False},
                       logging={"every_steps": 2, "tensorboard": False, "breakdown": True}, **sections)
    # no launcher environment: one process (the path a single-GPU user takes)
    r = subprocess.run([sys.executable, "-m", "vmae_ds.pretrain", "--config", str(cfg)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    run_dir = tmp / "runs" / name
    return run_dir, json.loads((run_dir / "run_info.json").read_text())["deepspeed_config"]


def test_engine_step_does_not_wait_for_batch_preparation_and_overlap_comm_changes_nothing(tmp_path):
    slow, slow_ds = _single(tmp_path, "slow_overlap",
                            debug={"step_sleep_s": STEP_SLEEP, "fetch_sleep_s": FETCH_SLEEP,
                                   "dump_gathered": str(tmp_path / "slow.pt")},
                            speed={"overlap_comm": True})
    plain, plain_ds = _single(tmp_path, "plain", debug={"dump_gathered": str(tmp_path / "plain.pt")})
    assert slow_ds["zero_optimization"]["overlap_comm"] is True
    assert plain_ds["zero_optimization"]["overlap_comm"] is False  # auto at world size 1

    a, b = torch.load(tmp_path / "slow.pt"), torch.load(tmp_path / "plain.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    ma, mb = metrics(slow), metrics(plain)
    assert [ma[s]["loss"] for s in range(1, STEPS + 1)] == [mb[s]["loss"] for s in range(1, STEPS + 1)]

    later = [ma[s] for s in range(2, STEPS + 1)]  # step 1 waits for the first batch
    mean_step = sum(r["step_time"] for r in later) / len(later)
    # the fetch sleeps 0.6 s while the step sleeps 0.8 s: overlapped, the step is 0.8 s + the tiny model's compute
    assert mean_step < STEP_SLEEP + FETCH_SLEEP / 2, [r["step_time"] for r in later]
    assert all(r["data_wait"] < 0.1 for r in later), [r["data_wait"] for r in later]
    assert set(later[0]["step_split"]) == {"next_batch", "forward", "backward", "optimizer"}
    assert all(r["step_split"]["next_batch"] < FETCH_SLEEP / 4 for r in later)
