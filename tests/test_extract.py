"""vmae-extract: sliding-window features per video, one .npy each plus an index; a rerun skips what is written;
an undecodable video is skipped and listed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from engine_helpers import ROOT
from safetensors.torch import save_file

from data_tools.synth import make_videos
from vmae_ds.models import create_classifier


def _extract(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmae_ds.extract", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})


def test_features_per_window_index_resume_and_bad_videos(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("vit_tiny_debug", 3)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    videos = make_videos(tmp_path / "v", 3, frames=20, size=(48, 64))
    (tmp_path / "v" / "broken.mp4").write_bytes(b"\x00" * 500)
    out = tmp_path / "f"
    r = _extract(str(tmp_path / "w.safetensors"), "--model", "debug", "--videos", str(tmp_path / "v"),
                 "--out", str(out), "--sampling-rate", "2", "--stride", "4", "--batch", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "features: 3 of 4 videos" in r.stdout and "1 undecodable" in r.stdout
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [p.stem for p in videos]
    # 20 frames, windows of 4 frames 2 apart (span 7), a window every 4 frames: starts 0, 4, 8, 12
    assert rows[0]["window_starts"] == [0, 4, 8, 12]
    feats = np.load(out / rows[0]["file"])
    assert feats.shape == (4, 48) and np.isfinite(feats).all()
    # the same clip through the model directly: window 0 = frames 0, 2, 4, 6, short side 32, centre crop
    from vmae_ds.data.decode import open_video
    from vmae_ds.data.transforms import normalize_on_device, spatial_views, to_tchw

    frames = to_tchw(open_video(videos[0].read_bytes()).get([0, 2, 4, 6]))
    x = normalize_on_device(spatial_views(frames, 32, 1)[0].unsqueeze(0))
    with torch.no_grad():
        want = model.fc_norm(model.forward_features(x)[0].mean(1))
    np.testing.assert_allclose(feats[0], want[0].numpy(), atol=1e-5)
    errors = [json.loads(line) for line in (out / "errors.rank0.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["broken"]

    before = (out / rows[0]["file"]).stat().st_mtime_ns
    r = _extract(str(tmp_path / "w.safetensors"), "--model", "debug", "--videos", str(tmp_path / "v"),
                 "--out", str(out), "--sampling-rate", "2", "--stride", "4", "--pool", "tokens")
    assert r.returncode == 0 and "kept 3 from before" in r.stdout  # resumable: written videos are skipped
    assert (out / rows[0]["file"]).stat().st_mtime_ns == before


def test_a_missing_model_name_is_one_line(tmp_path):
    save_file(create_classifier("vit_tiny_debug", 3).state_dict(), str(tmp_path / "w.safetensors"))
    r = _extract(str(tmp_path / "w.safetensors"), "--videos", str(tmp_path), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "give --model" in r.stderr
