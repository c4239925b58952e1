"""`make gpu-check` on a machine without CUDA says so in one line and exits 2; the pieces it runs that can run on a
CPU (the authors' step) are checked here; the GPU-only checks live under the `gpu` mark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for cmd in (["bash", "scripts/gpu_check.sh"], [sys.executable, "-m", "benchmarks.gpu_check"]):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr.strip() == ("gpu-check: no CUDA device here (torch.cuda.is_available() is False): run it "
                                    "on a GPU machine"), r.stderr
        assert r.stdout == ""


def test_authors_step_runs_and_reports(tmp_path):
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.authors_step", "--model", "debug", "--batch", "2",
                        "--num-sample", "2", "--steps", "1", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["samples_per_step"] == 4 and res["clips_per_s"] > 0 and "math attention" in res["config"]


def test_gpu_check_table_reads_every_stage_and_states_the_targets():
    from benchmarks.gpu_check import table

    results = {"tests": {"ok": True, "summary": "9 passed"},
               "bench": {"ok": False, "timed_out": True, "report": None, "ratios": [
                   {"model": "B", "kernel": "sdpa", "ckpt": "off", "batch": 16, "time": 1.71,
                    "time_no_optimizer": 1.8, "peak": 1.9, "paper_time": 1.79}]},
               "engine": {"g:2:none": {"ok": True, "clips_per_s": 300.0, "mfu": 0.41, "mfu_fwd_bwd": 0.5,
                                       "peak_gib": 70.0, "reserved_gib": 75.0, "startup_s": 31.0,
                                       "syncs_per_step": 3.0, "estimate_gib": 62.5,
                                       "split": {"next_batch": 0.0, "forward": 0.3, "backward": 0.6}},
                          "g:2:auto": {"ok": True, "clips_per_s": 310.0, "mfu": 0.43, "peak_gib": 66.0,
                                       "estimate_gib": 60.0, "ckpt_used": "selective 4"},
                          "g:3:full": {"ok": False, "error": "torch.OutOfMemoryError: CUDA out of memory."},
                          "B:2:none": {"ok": True, "clips_per_s": 2000.0, "mfu": 0.42}},
               "authors": {"ok": True, "clips_per_s": 100.0, "peak_gib": 60.0},
               "umt": {"ok": True, "clips_per_s": 500.0, "mfu": 0.3, "mfu_with_teacher": 0.5, "peak_gib": 20.0},
               "loader": {"ok": True, "clips_per_s": 800.0, "data_wait": 0.02, "workers": 14},
               "nvdec": {"ok": True, "workers": 14, "backends": ["pyav", "nvdec"],
                         "loader": {"pyav": {"samples_per_s": 900.0, "clips_per_s": 225.0, "cores_used": 13.5},
                                    "nvdec": {"samples_per_s": 2600.0, "clips_per_s": 650.0, "cores_used": 2.0}},
                         "engine": {"pyav": {"ok": True, "clips_per_s": 850.0, "data_wait": 0.6},
                                    "nvdec": {"ok": False, "error": "x"}}}}
    text = table(results)
    assert ("| ViT-g ZeRO-2 bf16, ckpt none | ok | 300.0 | 41.0% (50.0%) | 70.0 / 75.0 (62.5, +12%) | 31.0 | "
            "next batch 0% forward 30% backward 60%; 3 host syncs a step |") in text
    assert "| ViT-g ZeRO-2 bf16, ckpt auto -> selective 4 | ok | 310.0 | 43.0% | 66.0 / n/a (60.0, +10%) |" in text
    assert ("| decode pyav (CPU, 14 workers) | ok | 850.0 | | | | loader alone: 900.0 samples/s = 225.0 decoded "
            "clips/s, 13.5 CPU cores; ViT-B fed by it: data wait 60% |") in text
    assert "| decode nvdec (GPU (NVDEC)) | FAIL | n/a | | | | loader alone: 2600.0 samples/s = 650.0" in text
    results["nvdec"]["backends"] = ["pyav"]
    assert "| decode nvdec | not run | | | | | no CUDA device |" in table(results)
    assert "| ViT-g ZeRO-3 bf16, ckpt full | FAIL |" in text and "CUDA out of memory" in text
    assert "MFU with teacher 50.0%" in text and "14 workers, data wait 2%" in text
    assert ("| encoder-only / dual, ViT-B sdpa ckpt off b16 | 1.71x time | | | 1.90x peak | | paper 1.79x; 1.80x "
            "without the optimizer step |") in text
    assert "- ViT-g MFU, best run: 43.0% (below the target 45.0%)" in text
    assert "- ViT-B MFU, best run: 42.0% (meets the target 40.0%)" in text
    assert "- ViT-g clips/s over the authors' configuration: 3.10x (meets the target 2.50x)" in text


def test_engine_run_specs_are_checked_before_anything_runs():
    from benchmarks.gpu_check import parse_run

    assert parse_run("g:2:sel20:compile:fp32comm") == ("g_2_sel20_compile_fp32comm", [
        "deepspeed_config=ds_configs/zero2.json", "activation_checkpointing.mode=selective",
        "activation_checkpointing.num_blocks=20", "speed.compile=true"], {"communication_data_type": "fp32"})
    assert parse_run("g:2:auto:overlap")[1] == ["deepspeed_config=ds_configs/zero2.json",
                                                "activation_checkpointing.mode=auto", "speed.overlap_comm=true"]
    from benchmarks.gpu_check import resolve_best
    done = {"g:2:auto": {"ok": True, "clips_per_s": 300.0, "ckpt_used": "selective 7"},
            "g:2:full": {"ok": True, "clips_per_s": 250.0, "ckpt_used": "full"}, "B:2:none": {"ok": True}}
    assert resolve_best("g:2:best:compile", done) == "g:2:sel7:compile"
    assert resolve_best("g:2:best:compile", {}) == "g:2:auto:compile"
    for bad in ("g:4:none", "g:3:full:compile"):
        r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--runs", bad], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"engine run '{bad}'" in r.stderr.strip().splitlines()[-1], r.stderr


def test_smoke_engine_and_authors_stages_on_the_cpu(tmp_path):
    """The script itself, as a GPU session would run it, with tiny models on the CPU: every engine run and the
    authors' step report numbers, start-up time included."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--only", "engine", "authors",
                        "--runs", "g:2:auto:dschecks", "B:3:sel1:fp32comm", "--steps", "7", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    for spec in ("g:2:auto:dschecks", "B:3:sel1:fp32comm"):
        e = res["engine"][spec]
        assert e["ok"] and e["steps"] == 2 and e["clips_per_s"] > 0 and e["startup_s"] > 0, (spec, e)
        assert set(e["split"]) == {"next_batch", "forward", "backward", "optimizer"}
    auto = res["engine"]["g:2:auto:dschecks"]  # planned against host RAM on the CPU: the tiny model needs none
    assert auto["ckpt_used"] == "none" and auto["estimate_gib"] > 0, auto
    assert res["authors"]["ok"] and res["authors"]["clips_per_s"] > 0
    assert "| ViT-B ZeRO-3 bf16, ckpt sel1, fp32comm | ok |" in (tmp_path / "gpu_check.md").read_text()
    used = json.loads((tmp_path / "runs" / "B_3_sel1_fp32comm" / "run_info.json").read_text())["deepspeed_config"]
    assert used["communication_data_type"] == "fp32" and used["zero_optimization"]["stage"] == 3
