"""The in-run probe on real DeepSpeed ranks (ZeRO-3, 2 CPU ranks) and vmae-probe on what the run wrote.

Three launches: a run with the probe on (every 4 steps, and before the first step); a run with it off that
stops at step 6, then resumes with it on to step 12. The losses of every step must be the same in all of them
(the probe changes no training step; a resume across probe steps 8 and 12 is exact) and the resumed run's
probes must score what the uninterrupted run's did. One held-out probe shard is truncated: its lost clips are
named and skipped, the probe and the run go on. vmae-probe then scores the run's final weights with the same
features the in-run probe used, and beats nothing at random init by construction only if it learns.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from engine_helpers import ROOT, env, metrics, run, write_config

pytestmark = pytest.mark.distributed

PROBE_EVERY = 4


def _data_tools(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)


@pytest.fixture(scope="module")
def probe_sets(tmp_path_factory):
    """Labelled motion-class shards: train 4 x 6 clips (shards of 4), val 4 x 3 (3 shards, the second cut
    in half: a damaged shard)."""
    tmp = tmp_path_factory.mktemp("probe_sets")
    for split, n, seed in (("train", 6, 0), ("val", 3, 5000)):
        _data_tools("synth", "--out", str(tmp / "videos" / split), "--motion-classes", "4", "--n", str(n),
                    "--frames", "16", "--size", "64x64", "--seed", str(seed))
        _data_tools("manifest", str(tmp / "videos" / split), "--out", str(tmp / f"{split}.jsonl"),
                    "--labels-from-dirs")
        _data_tools("build", "--manifest", str(tmp / f"{split}.jsonl"), "--out", str(tmp / split), "--workers", "1",
                    "--shard-size", "4", "--shuffle-seed", "0", "--quiet")
    bad = tmp / "val" / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return tmp


@pytest.fixture(scope="module")
def runs(probe_sets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_runs")
    probe = {"every_steps": PROBE_EVERY, "train_shards": str(probe_sets / "train"),
             "val_shards": str(probe_sets / "val"), "max_samples": 16, "num_workers": 0, "batch_size": 4, "k": 5}
    # drop path draws from the global torch RNG every step: a probe that moved that stream would change losses
    common = {"output_dir": str(tmp / "runs"), "optim": {"max_steps": 12},
              "model": {"name": "vit_tiny_debug", "attention": "sdpa", "drop_path_rate": 0.2},
              "checkpoint": {"every_steps": 6, "keep_last": 2}, "logging": {"every_steps": 3, "tensorboard": True}}
    on = write_config(tmp / "on.yaml", name="on", probe=probe, **common)
    off = write_config(tmp / "off.yaml", name="split", **common)
    code, log_on = run("--config", str(on), log=tmp / "on.log")
    assert code == 0, log_on[-3000:]
    code, log_off = run("--config", str(off), "optim.max_steps=6", log=tmp / "off.log")
    assert code == 0, log_off[-3000:]
    code, log_resumed = run("--config", str(on), "name=split", "--resume", "auto", log=tmp / "resumed.log")
    assert code == 0, log_resumed[-3000:]
    return {"dir": tmp / "runs", "log_on": log_on, "log_off": log_off, "log_resumed": log_resumed,
            "sets": probe_sets}


def test_probe_changes_no_loss_and_a_resume_across_probe_steps_is_exact(runs):
    with_probe, split = metrics(runs["dir"] / "on"), metrics(runs["dir"] / "split")
    steps = range(1, 13)
    assert [with_probe[s]["loss"] for s in steps] == [split[s]["loss"] for s in steps]  # bitwise, fp32
    assert [with_probe[s]["grad_norm"] for s in steps] == [split[s]["grad_norm"] for s in steps]
    assert "resumed from" in runs["log_resumed"] and "probe at" not in runs["log_off"]
    probed = {s: r["probe"] for s, r in with_probe.items() if "probe" in r}
    assert sorted(probed) == [0, 4, 8, 12]  # at_start, then every 4 steps
    assert "loss" not in with_probe[0]  # the initial weights' probe has its own record
    # the resumed run probes at 8 and 12 and scores exactly what the uninterrupted run scored
    again = {s: r["probe"] for s, r in split.items() if "probe" in r}
    assert sorted(again) == [8, 12]
    for s in (8, 12):
        assert {k: again[s][k] for k in ("top1", "top5", "train", "val")} == \
               {k: probed[s][k] for k in ("top1", "top5", "train", "val")}
    # the progress line carries the newest probe; TensorBoard and the plot are written
    assert "| probe knn top-1" in runs["log_on"] and "@ step 12" in runs["log_on"]
    assert (runs["dir"] / "on" / "probe.png").stat().st_size > 1000
    assert (runs["dir"] / "on" / "probe_in_run" / "eval.md").exists()
    tb = list((runs["dir"] / "on" / "tb").glob("events.*"))
    assert tb and any(b"probe/top1" in p.read_bytes() for p in tb)


def test_damaged_probe_shard_is_named_and_skipped_and_the_cap_holds(runs):
    rec = metrics(runs["dir"] / "on")[12]["probe"]
    assert rec["train"] == 16  # max_samples of 24 training clips
    assert rec["skipped"] > 0 and rec["damaged_shards"] == ["shard-000001.tar"]
    assert rec["val"] + rec["skipped"] == 12 and rec["top1"] is not None
    assert "unreadable probe clips skipped (shards shard-000001.tar)" in runs["log_on"]


def _probe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmae_ds.probe.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env())


def test_vmae_probe_scores_the_run_as_the_in_run_probe_did_and_caches_features(runs, tmp_path):
    sets, run_dir = runs["sets"], runs["dir"] / "on"
    args = [str(run_dir), "--train-shards", str(sets / "train"), "--val-shards", str(sets / "val"),
            "--max-samples", "16", "--workers", "0", "--k", "5", "--out", str(tmp_path / "p"),
            "--attentive-epochs", "5"]
    r = _probe_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "p" / "probe.json").read_text())
    by_kind = {p["probe"]: p for p in report["probes"]}
    assert sorted(by_kind) == ["attentive", "knn", "linear"]
    in_run = metrics(run_dir)[12]["probe"]  # the same final weights, the same pooled features
    assert by_kind["knn"]["top1"] == pytest.approx(in_run["top1"], abs=1e-9)
    assert by_kind["knn"]["invalid_count"] == in_run["skipped"]
    for kind in by_kind:
        per = json.loads((tmp_path / "p" / kind / "eval.json").read_text())
        assert len(per["per_class"]) == 4 and (tmp_path / "p" / kind / "confusion.png").exists()
    assert "unreadable clips skipped (shards shard-000001.tar)" in r.stdout
    cached = sorted((tmp_path / "p" / "features").glob("*.pt"))
    assert len(cached) == 2
    stamp = [p.stat().st_mtime_ns for p in cached]
    r = _probe_cli(*args, "--probes", "knn")  # resumable: the cached features are used, not re-extracted
    assert r.returncode == 0 and "kept" in (tmp_path / "p" / "probe.md").read_text()
    assert [p.stat().st_mtime_ns for p in cached] == stamp


def test_vmae_probe_reads_umt_students_and_random_init(runs, tmp_path):
    from safetensors.torch import save_file

    from vmae_ds.models.umt import UMTStudent

    torch.manual_seed(3)
    student = UMTStudent(img_size=32, patch_size=8, num_frames=4, tubelet_size=1, dim=48, depth=2, num_heads=3,
                         mlp_ratio=4.0, teacher_dim=32, align_layers=1)
    save_file(student.state_dict(), str(tmp_path / "umt.safetensors"))
    sets = runs["sets"]
    for extra in ([str(tmp_path / "umt.safetensors"), "--model", "debug", "--frames", "4", "--tubelet", "1"],
                  [str(runs["dir"] / "on"), "--random-init"]):
        r = _probe_cli(*extra, "--train-shards", str(sets / "train"), "--val-shards", str(sets / "val"),
                       "--probes", "knn,linear", "--workers", "0", "--out", str(tmp_path / extra[-1][-4:]))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "probe knn: top-1" in r.stdout and "probe linear: top-1" in r.stdout
    r = _probe_cli(str(tmp_path / "umt.safetensors"), "--model", "debug", "--train-shards", str(sets / "train"),
                   "--val-shards", str(sets / "val"), "--probes", "knn,svm")
    assert r.returncode == 2 and "--probes: unknown ['svm']" in r.stderr and r.stderr.count("\n") == 1


def test_umt_runs_probe_their_student(probe_sets, tmp_path):
    """The umt objective gives its student's features to the same probe (one rank, ZeRO-2, linear probe)."""
    from engine_helpers import objective_sections

    sections = objective_sections(tmp_path, "umt")
    sections["model"]["num_frames"] = 4
    probe = {"every_steps": 2, "train_shards": str(probe_sets / "train"), "val_shards": str(probe_sets / "val"),
             "kind": "linear", "num_workers": 0, "batch_size": 4}
    cfg = write_config(tmp_path / "umt.yaml", name="umt", output_dir=str(tmp_path / "runs"), probe=probe,
                       deepspeed_config=str(ROOT / "ds_configs" / "zero2.json"), optim={"max_steps": 2},
                       logging={"every_steps": 1, "tensorboard": False}, **sections)
    code, log = run("--config", str(cfg), log=tmp_path / "umt.log", ranks=1)
    assert code == 0, log[-3000:]
    recs = metrics(tmp_path / "runs" / "umt")
    assert recs[0]["probe"]["kind"] == "linear" and recs[2]["probe"]["train"] == 24
    assert recs[2]["probe"]["top1"] is not None and "probe at step 2: linear top-1" in log
