"""A clip whose decoding crashes its process and one whose decoding hangs: training goes on, both are counted and
named in the progress line, and a resume (even from a checkpoint written before they happened) does not replay
them, since the run folder keeps the quarantine. Real shards, 2 CPU ranks, a test-only decoder hook."""

from __future__ import annotations

import json

import pytest
from data_helpers import uneven_shards
from engine_helpers import metrics, run, write_config

pytestmark = pytest.mark.distributed


def keys_by_rank(run_dir) -> dict[int, list[str]]:
    return {int(f.name.split("rank")[1].split(".")[0]): [k for line in f.read_text().splitlines()
                                                         for k in json.loads(line)["keys"]]
            for f in run_dir.glob("keys.rank*.jsonl")}


def test_crashing_and_hanging_clips_are_skipped_named_and_never_replayed(tmp_path_factory, tmp_path):
    shards = uneven_shards(tmp_path_factory)
    data = {"kind": "shards", "num_sample": 1, "shards": {"shards": str(shards), "sampling_rate": 2,
                                                          "num_workers": 2, "decode_timeout_s": 4}}
    common = dict(output_dir=str(tmp_path / "runs"), data=data, optim={"batch_size": 1, "max_steps": 6},
                  logging={"every_steps": 1, "tensorboard": False}, checkpoint={"every_steps": 2, "keep_last": 5})
    # which clips come when: a run without faults (the same seed gives the same order)
    cfg = write_config(tmp_path / "probe.yaml", name="probe", debug={"log_keys": True}, **common)
    code, log = run("--config", str(cfg), log=tmp_path / "probe.log")
    assert code == 0, log[-3000:]
    order = keys_by_rank(tmp_path / "runs" / "probe")
    crash, hang = order[0][3], order[1][4]  # consumed after the step-2 checkpoint, one on each rank

    faults = {crash: "crash", hang: "hang"}
    cfg = write_config(tmp_path / "c.yaml", name="f", debug={"log_keys": True, "decode_faults": faults}, **common)
    code, log = run("--config", str(cfg), log=tmp_path / "a.log")
    assert code == 0, log[-3000:]
    run_dir = tmp_path / "runs" / "f"
    assert sorted(metrics(run_dir)) == list(range(1, 7))  # it went on
    assert f"decoder crashed on 1: {crash}" in log and f"decoder hung on 1: {hang}" in log
    assert log.count("quarantined it") == 2  # the loader's warning, once per incident
    assert set(json.loads((run_dir / "quarantine.json").read_text())["keys"]) == {crash, hang}
    consumed = [k for ks in keys_by_rank(run_dir).values() for k in ks]
    assert crash not in consumed and hang not in consumed

    # resume from an early checkpoint: neither clip is decoded again (the loaders prefetch, so the step-2
    # checkpoint may already know of them; the run folder's quarantine.json covers any earlier one)
    (run_dir / "keys.rank0.jsonl").unlink()
    (run_dir / "keys.rank1.jsonl").unlink()
    code, log = run("--config", str(cfg), "--resume", str(run_dir / "checkpoints" / "step_00000002"),
                    log=tmp_path / "b.log")
    assert code == 0, log[-3000:]
    assert "step_00000002 at step 2" in log
    assert "quarantined it" not in log  # no new incident: nothing replayed
    consumed = [k for ks in keys_by_rank(run_dir).values() for k in ks]
    assert len(consumed) == 8 and crash not in consumed and hang not in consumed


def test_the_run_folder_quarantine_reaches_the_loader(tmp_path):
    from vmae_ds.engine.quarantine import read_quarantine, write_quarantine
    from vmae_ds.engine.run_config import load_run_config
    from vmae_ds.objectives.mae import loader_extras

    cfg = load_run_config(write_config(tmp_path / "c.yaml", name="q", output_dir=str(tmp_path / "runs")))
    assert "quarantine" not in loader_extras(cfg)
    cfg.run_dir.mkdir(parents=True)
    write_quarantine(cfg.run_dir, ["b.tar/k2", "a.tar/k1", "a.tar/k1"])
    assert read_quarantine(cfg.run_dir) == ["a.tar/k1", "b.tar/k2"]
    assert loader_extras(cfg)["quarantine"] == ["a.tar/k1", "b.tar/k2"]
    (cfg.run_dir / "quarantine.json").write_text("{oops")
    with pytest.raises(ValueError, match="quarantine.json: unreadable quarantine list"):
        read_quarantine(cfg.run_dir)
