"""Launcher scripts: paths given relative to the caller's folder survive the script's `cd` to the checkout."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the script in its own checkout, and a stand-in interpreter that records how it was called
    (the launcher itself is not under test; nothing is written into the real checkout)."""
    co = tmp_path / "checkout"
    (co / "scripts").mkdir(parents=True)
    (co / "configs").mkdir()
    (co / "configs" / "shipped.yaml").write_text("name: x\n")
    shutil.copy(ROOT / "scripts" / "train_multinode.sh", co / "scripts")
    record = tmp_path / "called.txt"
    py = tmp_path / "python"
    py.write_text(f'#!/usr/bin/env bash\n{{ pwd; printf "%s\\n" "$@"; }} > {record}\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return co, py


def _run(co: Path, py: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # in-process DeepSpeed tests earlier in the session export MASTER_ADDR/PORT: the script must not see them
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "MASTER_"))}
    return subprocess.run(["bash", str(co / "scripts" / "train_multinode.sh"), *args], cwd=cwd,
                          env=dict(env, PY=str(py)), capture_output=True, text=True, timeout=60)


def test_multinode_script_keeps_relative_paths_of_the_caller(tmp_path):
    co, py = _fake_checkout(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "hosts").write_text("# nodes\nnode001 slots=8\nnode002 slots=8\n")
    (work / "mine.yaml").write_text("name: y\n")
    r = _run(co, py, work, "hosts", "mine.yaml", "optim.batch_size=4")
    assert r.returncode == 0, r.stderr
    cwd, *args = (tmp_path / "called.txt").read_text().splitlines()
    assert cwd == str(co)  # runs from the checkout (DeepSpeed reads ./.deepspeed_env there)
    assert args[args.index("--hostfile") + 1] == str(work / "hosts")
    assert args[args.index("--config") + 1] == str(work / "mine.yaml")
    assert args[args.index("--master_addr") + 1] == "node001" and args[-1] == "optim.batch_size=4"
    r = _run(co, py, work, "hosts", "configs/shipped.yaml")  # not here, but in the checkout: taken there
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "called.txt").read_text().splitlines()
    assert args[args.index("--config") + 1] == str(co / "configs" / "shipped.yaml")


def test_multinode_script_names_a_missing_hostfile(tmp_path):
    co, py = _fake_checkout(tmp_path)
    r = _run(co, py, tmp_path, "no_hosts", "x.yaml")
    assert r.returncode == 2 and "hostfile not found: " + str(tmp_path / "no_hosts") in r.stderr
    assert not (tmp_path / "called.txt").exists()
