"""`python -m benchmarks` end to end in a fresh process, with the real DeepSpeed ZeRO-3 bf16 row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_the_tool():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "encoder-only" in out.stdout and "--preset" in out.stdout and "make bench" in out.stdout


def test_smoke_run_with_deepspeed_row(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "smoke", "--kernels", "sdpa", "--ckpt", "off",
           "--ds", "debug:2", "--out", str(tmp_path), "--quiet", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DeepSpeed engine:" in out.stdout and "| debug | 2 | dual |" in out.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    ds = data["deepspeed"]
    assert ds["zero_stage"] == 3 and ds["precision"].startswith("bf16")
    assert ds["world_size"] == 1 and ds["step_time_s"] > 0 and ds["tflops"] > 0


def test_loader_bench_help_and_missing_shards(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.loader_bench"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m benchmarks.loader_bench")
    assert "frames per clip (default 16)" in out.stdout and "crop side in pixels (default 224)" in out.stdout
    out = subprocess.run([*cmd, "--shards", str(tmp_path / "nope"), "--batches", "1"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--shards: 1 of 1 shard(s) not found" in out.stderr and "nope" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--ds", "foo"], "argument --ds: size 'foo' is not one of S, B, L, H, g, debug"),
    (["--ds", "g:abc"], "argument --ds: expected an integer, got 'abc'"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),  # used to be ignored silently
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),  # used to crash after the run (empty median)
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--models", "debug", "--frames", "3"], "--frames 3 does not fit debug: img_size 32 / num_frames 3")])
def test_bad_arguments_stop_before_any_step_with_one_line(capsys, args, message):
    from benchmarks.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--device", "cpu", "--no-ds", "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ds_row_accepts_aliases_full_names_and_a_default_batch():
    from benchmarks.cli import build_parser

    p = build_parser()
    assert p.parse_args(["--ds", "g:8"]).ds == ("g", 8)
    assert p.parse_args(["--ds", "vit_base_patch16:2"]).ds == ("vit_base_patch16", 2)
    assert p.parse_args(["--ds", "debug"]).ds == ("debug", 1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_device_cuda_without_cuda_is_one_line(capsys):
    from benchmarks.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--device", "cuda", "--quiet"])
    assert e.value.code == 2 and "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_unwritable_out_stops_before_any_step(tmp_path, capsys):
    from benchmarks.cli import main

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--device", "cpu", "--no-ds", "--quiet", "--out", str(tmp_path / "a_file" / "r")])
    assert e.value.code == 2 and "cannot create the report folder" in capsys.readouterr().err


def test_every_finished_pair_is_handed_on_so_a_cut_run_keeps_its_ratios():
    import torch
    from tqdm import tqdm

    from benchmarks.analysis import ratio_rows
    from benchmarks.presets import PRESETS
    from benchmarks.suite import Suite

    seen: list[int] = []
    from dataclasses import replace

    preset = replace(PRESETS["smoke"], ckpt=("off",))
    suite = Suite(preset, torch.device("cpu"), torch.bfloat16, None, 80 * 2**30, progress=False)
    with tqdm(disable=True) as bar:
        result = suite.run(bar, on_pair=lambda rows: seen.append(len(rows)))
    assert seen == [2, 4]  # (math, sdpa) x (encoder-only + dual), handed on pair by pair
    assert [r["kernel"] for r in ratio_rows(result["measured"][:2])] == ["math"]
