"""Report writer (JSON keys, file names, PNG) on a real smoke run, plus the pure helpers."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.analysis import ratio_rows, speed_rows
from benchmarks.cli import main
from benchmarks.memory_search import estimate_max_batch, largest_fitting
from benchmarks.report import report_stem, summary


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--preset", "smoke", "--out", str(out), "--quiet", "--no-ds"]) == 0
    return out


def test_files_named_model_hardware_date(smoke):
    mds = list(smoke.glob("*.md"))
    assert len(mds) == 1
    assert re.fullmatch(r"debug_(cpu\d+|[a-z0-9-]+)_\d{4}-\d{2}-\d{2}\.md", mds[0].name)
    stem = mds[0].stem
    png = smoke / f"{stem}.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = mds[0].read_text()
    assert f"![cells and ratios]({png.name})" in text
    assert "| encoder_only |" in text and "measured" in text and "computed" in text


def test_json_has_every_number_and_the_environment(smoke):
    data = json.loads(next(smoke.glob("*.json")).read_text())
    env = data["env"]
    assert {"hardware", "software", "git", "command", "date"} <= set(env)
    assert env["command"].startswith("vmae-bench --preset smoke")
    assert {"torch", "deepspeed", "python"} <= set(env["software"])
    assert len(data["measured"]) == 8  # 2 maskings x 2 kernels x 2 checkpointing settings
    row = data["measured"][0]
    for key in ("step_time_s", "step_times_s", "time_per_clip_s", "tflops", "saved_activation_bytes",
                "weight_cast_bytes", "flops", "max_batch_estimate", "source"):
        assert key in row, key
    assert row["source"] == "measured" and row["step_time_s"] > 0
    assert {r["source"] for r in data["computed"]} == {"computed"}
    assert len(data["ratios"]) == 8 and data["speed"]
    assert report_stem(data) == next(smoke.glob("*.md")).stem


def test_summary_prints_tables(smoke):
    text = summary(json.loads(next(smoke.glob("*.json")).read_text()))
    assert "Encoder-only / dual ratios:" in text and "| debug |" in text


def _row(masking, kernel, ckpt, t, saved, source="measured"):
    return {"model": "B", "masking": masking, "kernel": kernel, "ckpt": ckpt, "source": source, "batch": 1,
            "num_frames": None, "time_per_clip_s": t, "step_time_s": t, "optimizer_time_s": 1.0,
            "activation_bytes_per_clip": saved,
            "flops": {"analytic": {"train_flops_per_clip": 3.0 if masking == "encoder_only" else 2.0,
                                   "fwd_decoder_share": 0.3}},
            "tokens": {"decoder": 1568 if masking == "encoder_only" else 944}, "max_batch_estimate": 10}


def test_ratios_and_speed_from_rows():
    rows = [_row("encoder_only", "math", "on", 4.0, 300.0), _row("dual", "math", "on", 2.0, 100.0),
            _row("encoder_only", "sdpa", "off", 1.5, 120.0), _row("dual", "sdpa", "off", 1.0, 100.0)]
    ratios = {r["kernel"]: r for r in ratio_rows(rows)}
    assert ratios["math"]["time"] == 2.0 and ratios["math"]["saved"] == 3.0 and ratios["math"]["flops"] == 1.5
    assert ratios["math"]["paper_time"] == 1.79
    assert "1.33x the FLOP ratio" in ratios["math"]["explanation"]
    assert "eager kernel" in ratios["math"]["explanation"]
    assert ratios["math"]["time_no_optimizer"] == (4.0 - 1.0) / (2.0 - 1.0)  # the shared 1 s AdamW step removed
    (speed,) = speed_rows(rows)
    assert speed["best"] == "dual/sdpa/ckpt-off"
    assert speed["speedup_vs_official_dual"] == 2.0 and speed["speedup_vs_official_encoder_only"] == 4.0


def test_max_batch_search_and_estimate():
    assert largest_fitting(lambda b: b <= 37) == 37
    assert largest_fitting(lambda b: b <= 1) == 1
    assert largest_fitting(lambda b: False) == 0
    assert largest_fitting(lambda b: True, limit=100) == 100
    assert estimate_max_batch(num_params=1000, saved_bytes_per_clip=100.0, budget_bytes=16_000 + 550) == 5
