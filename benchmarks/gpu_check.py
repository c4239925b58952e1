"""`make gpu-check`: everything that needs a GPU, in one command, one table, under 8 minutes on one H100/H200.

Stages (each a subprocess with its own time budget; a stage that fails or runs out of time is reported as such
and the next one runs):
  tests      the `gpu`-marked tests (kernel parity incl. head dim 88, bf16 weights as training uses them, the
             host-sync-free step under torch.cuda.set_sync_debug_mode)
  bench      vmae-bench for ViT-B and ViT-g: every kernel, dual vs encoder-only, checkpointing off / on, peak
             memory, the largest micro-batch (its own report in OUT/bench)
  engine     ViT-g dual masking under the engine, synthetic clips held in memory (the loader is not measured),
             bf16, ZeRO-2 and ZeRO-3: clips/s, MFU, peak memory, step split (data / forward / backward / optimizer)
  authors    the same ViT-g step the authors' way: fp16 autocast + grad scaler, eager math attention, every block
             checkpointed, plain PyTorch: the speedup is a ratio of two numbers from this one run
  umt        UMT-B's step (CLIP ViT-B/16 teacher with random weights) under the engine
  loader     ViT-B under the engine on real shards (320p H.264, num_workers = the machine's cores): data wait

Without CUDA it says so in one line and exits 2. Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"g_mfu": 0.45, "b_mfu": 0.40, "g_speedup": 2.5}  # issue: the speed the engine must reach


def _run(cmd: list[str], budget: float, log: Path, env: dict | None = None) -> tuple[int | None, float]:
    """(exit code or None when out of time, seconds)."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                             start_new_session=True)
        try:
            code = p.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            code = None
    return code, time.time() - t0


def _metrics(run_dir: Path, skip: int) -> dict:
    """Mean of the per-step records after `skip` warm-up steps."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r["step"] > skip] or recs
    t = sum(r["step_time"] for r in recs)
    if not recs or t <= 0:
        return {"steps": 0}
    out = {"steps": len(recs), "clips_per_s": sum(r["clips_per_s"] * r["step_time"] for r in recs) / t,
           "mfu": None if recs[-1].get("mfu") is None else sum(r["mfu"] * r["step_time"] for r in recs) / t,
           "peak_gib": max(r["peak_mem_gib"] for r in recs),
           "reserved_gib": max((r.get("peak_reserved_gib") or 0) for r in recs),
           "data_wait": sum(r["data_wait"] * r["step_time"] for r in recs) / t}
    if recs[-1].get("step_split"):
        out["split"] = {k: sum(r["step_split"].get(k, 0) for r in recs) / t for k in recs[-1]["step_split"]}
    if recs[-1].get("mfu_with_teacher") is not None:
        out["mfu_with_teacher"] = sum(r["mfu_with_teacher"] * r["step_time"] for r in recs) / t
    return out


GPU_TEST_FILES = ["tests/test_attention.py", "tests/test_gpu_step.py", "tests/test_bench_gpu.py",
                  "tests/test_augment.py"]


def _decoder() -> str:
    """The shard decoder this machine has: decord (decord2) when importable, else PyAV (the GPU wheelhouse may
    carry only one, to stay under its size limit)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return "pyav"
    return "decord"


def stage_tests(out: Path, budget: float, smoke: bool = False) -> dict:
    code, s = _run([sys.executable, "-m", "pytest", "-q", "-rf", "--tb=line", "-m", "gpu", *GPU_TEST_FILES, "-p",
                    "no:cacheprovider", "--continue-on-collection-errors"], budget, out / "tests.log")
    tail = (out / "tests.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    return {"ok": code == 0, "seconds": s, "summary": tail[0], "timed_out": code is None}


def stage_bench(out: Path, budget: float, smoke: bool = False) -> dict:
    # the engine stage runs ViT-g under DeepSpeed, and a max-batch search of every cell would not fit the budget
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "gpu", "--models", "B", "g", "--steps", "3",
           "--warmup", "1", "--kernels", "sdpa", "math", "--ckpt", "off", "--no-ds", "--no-search-max-batch",
           "--compute", "--quiet", "--out", str(out / "bench")]
    if smoke:
        cmd = [sys.executable, "-m", "benchmarks", "--preset", "cpu", "--models", "debug", "--steps", "1",
               "--kernels", "sdpa", "--ckpt", "off", "--out", str(out / "bench")]
    code, s = _run(cmd, budget, out / "bench.log")
    reports = sorted((out / "bench").glob("*.json")) if (out / "bench").is_dir() else []
    return {"ok": code == 0, "seconds": s, "timed_out": code is None,
            "report": str(reports[-1]) if reports else None}


def _engine(out: Path, name: str, budget: float, overrides: list[str], config: str, skip: int = 5) -> dict:
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "vmae_ds.pretrain", "--config", config, f"name={name}",
           f"output_dir={out / 'runs'}", "logging.every_steps=10", "logging.breakdown=true",
           "logging.tensorboard=false", "checkpoint.every_steps=100000", "checkpoint.at_end=false", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    code, s = _run(cmd, budget, out / f"{name}.log", env)
    res = {"ok": code == 0, "seconds": s, "timed_out": code is None}
    if (run_dir / "metrics.jsonl").exists():
        res.update(_metrics(run_dir, skip))
    return res


SMOKE = ["model.name=vit_tiny_debug", "masks.encoder_ratio=0.75", "model.attention=sdpa"]


def stage_engine(out: Path, budget: float, steps: int, batch: int, smoke: bool = False) -> dict:
    common = ["data.kind=synthetic", "data.synthetic.num_videos=64", f"optim.max_steps={steps}",
              f"optim.batch_size={batch}"] + (SMOKE if smoke else [])
    recipe = "configs/pretrain/vit_giant_hybrid.yaml"
    return {stage: _engine(out, f"g_{stage}", budget / 2, [f"deepspeed_config=ds_configs/{stage}.json", *common],
                           recipe) for stage in ("zero2", "zero3")}


def stage_authors(out: Path, budget: float, batch: int, steps: int, smoke: bool = False) -> dict:
    extra = ["--model", "debug", "--device", "cpu"] if smoke else ["--model", "g"]
    code, s = _run([sys.executable, "-m", "benchmarks.authors_step", *extra, "--batch", str(batch),
                    "--steps", str(steps), "--out", str(out / "authors.json")], budget, out / "authors.log")
    res = {"ok": code == 0, "seconds": s, "timed_out": code is None}
    if (out / "authors.json").exists():
        res.update(json.loads((out / "authors.json").read_text()))
    return res


def stage_umt(out: Path, budget: float, steps: int, smoke: bool = False) -> dict:
    name = "clip_tiny_debug" if smoke else "clip_b16"
    clip = out / f"{name}_random.pt"
    subprocess.run([sys.executable, "-c", "from vmae_ds.models.clip_teacher import random_openai_state_dict as r, "
                    f"save_openai_state_dict as s; s(r('{name}'), r'{clip}')"], cwd=ROOT, check=False)
    recipe = "configs/pretrain/umt_debug_cpu.yaml" if smoke else "configs/pretrain/umt_b16_k710.yaml"
    return _engine(out, "umt_b", budget, ["data.kind=synthetic", "data.synthetic.num_videos=64",
                                          f"optim.max_steps={steps}", f"umt.teacher.path={clip}"], recipe)


def stage_loader(out: Path, budget: float, steps: int, smoke: bool = False) -> dict:
    """ViT-B under the engine on real 320p H.264 shards, with as many decode workers as the machine has cores
    to spare: the data wait says whether the loader keeps the GPU fed."""
    t0 = time.time()
    workers = max(1, (os.cpu_count() or 2) - 2)
    videos, shards = out / "videos", out / "shards"
    cli = [sys.executable, "-m", "data_tools"]
    backend = _decoder()
    size = "48x64" if smoke else "320x426"
    for args in (["synth", "--out", str(videos), "--n", "48", "--frames", "96", "--size", size],
                 ["manifest", str(videos), "--out", str(out / "videos.jsonl")],
                 ["build", "--manifest", str(out / "videos.jsonl"), "--out", str(shards), "--workers",
                  str(workers), "--shard-size", "8", "--backend", backend, "--quiet"]):
        if not (shards / "index.json").exists():
            r = subprocess.run(cli + args, cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    over = [*SMOKE, "optim.batch_size=2"] if smoke else []
    res = _engine(out, "b_shards", budget - (time.time() - t0),
                  ["data.kind=shards", f"data.shards.shards={shards}", f"data.shards.num_workers={workers}",
                   f"data.shards.backend={backend}", f"optim.max_steps={steps}", *over],
                  "configs/pretrain/vit_base_hybrid.yaml")
    res["workers"] = workers
    return res


def table(results: dict) -> str:
    rows = ["| check | result | clips/s | MFU | peak / reserved GiB | notes |", "|---|---|---|---|---|---|"]
    results = {k: v for k, v in results.items()}
    for name in ("tests", "bench", "engine", "authors", "umt", "loader"):
        results.setdefault(name, {"ok": None})

    def fmt(x: float | None, pct: bool = False) -> str:
        return "n/a" if x is None else (f"{x * 100:.1f}%" if pct else f"{x:.1f}")

    t = results.get("tests", {})
    rows.append(f"| gpu tests | {_status(t, 'pass')} | | | | {t.get('summary', '')} |")
    b = results.get("bench", {})
    rows.append(f"| vmae-bench B, g | {_status(b, 'done')} | | | | report {b.get('report')} |")
    for stage in ("zero2", "zero3"):
        e = results.get("engine", {}).get(stage, {})
        split = " ".join(f"{k} {v * 100:.0f}%" for k, v in e.get("split", {}).items())
        rows.append(f"| ViT-g engine {stage} bf16 | {_status(e)} | {fmt(e.get('clips_per_s'))} | "
                    f"{fmt(e.get('mfu'), True)} | {fmt(e.get('peak_gib'))} / {fmt(e.get('reserved_gib'))} | {split} |")
    a = results.get("authors", {})
    rows.append(f"| ViT-g authors' config | {_status(a)} | {fmt(a.get('clips_per_s'))} | | "
                f"{fmt(a.get('peak_gib'))} | fp16 autocast, math attention, every block checkpointed |")
    best = max((results.get("engine", {}).get(s, {}).get("clips_per_s") or 0) for s in ("zero2", "zero3"))
    if best and a.get("clips_per_s"):
        rows.append(f"| speedup vs authors | {best / a['clips_per_s']:.2f}x | | | | target "
                    f">= {TARGETS['g_speedup']}x |")
    u = results.get("umt", {})
    rows.append(f"| UMT-B engine | {_status(u)} | {fmt(u.get('clips_per_s'))} | "
                f"{fmt(u.get('mfu'), True)} | {fmt(u.get('peak_gib'))} | MFU with teacher "
                f"{fmt(u.get('mfu_with_teacher'), True)} |")
    ld = results.get("loader", {})
    wait = ld.get("data_wait")
    rows.append(f"| ViT-B on real shards | {_status(ld)} | {fmt(ld.get('clips_per_s'))} | "
                f"{fmt(ld.get('mfu'), True)} | {fmt(ld.get('peak_gib'))} | {ld.get('workers')} workers, data wait "
                f"{'n/a' if wait is None else f'{wait * 100:.0f}%'} |")
    return "\n".join(rows)


def _status(stage: dict, ok: str = "ok") -> str:
    if stage.get("ok") is None:
        return "not run"
    return ok if stage["ok"] else ("TIMEOUT" if stage.get("timed_out") else "FAIL")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/gpu_check", help="report folder (default reports/gpu_check)")
    p.add_argument("--budget", type=float, default=470, help="seconds for everything (default 470, < 8 min)")
    p.add_argument("--only", nargs="*", choices=("tests", "bench", "engine", "authors", "umt", "loader"),
                   help="run only these stages")
    p.add_argument("--g-batch", type=int, default=32, help="ViT-g clips per micro-step (x num_sample 4)")
    p.add_argument("--steps", type=int, default=15, help="engine steps per run (the first 5 are warm-up)")
    p.add_argument("--smoke", action="store_true", help="developers: every stage with tiny models on the CPU, to "
                   "check this script itself before a GPU is lent")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    start, results = time.time(), {"device": device, "torch": torch.__version__}
    sm = args.smoke
    # shares from the first H200 runs: a ViT-g engine run needs ~40 s to start and ~1 s a step at 128 samples
    plan = [("tests", 60, lambda b: stage_tests(out, b, sm)),
            ("bench", 90, lambda b: stage_bench(out, b, sm)),
            ("engine", 150, lambda b: stage_engine(out, b, args.steps, args.g_batch, sm)),
            ("authors", 60, lambda b: stage_authors(out, b, args.g_batch, 6 if not sm else 1, sm)),
            ("umt", 50, lambda b: stage_umt(out, b, args.steps, sm)),
            ("loader", 60, lambda b: stage_loader(out, b, 15 if not sm else 3, sm))]
    plan = [p for p in plan if not args.only or p[0] in args.only]
    total_share = sum(share for _, share, _ in plan)
    for name, share, fn in plan:
        left = args.budget - (time.time() - start)
        if left < 20:
            results[name] = {"ok": False, "skipped": "out of the time budget"}
            continue
        mine = min(left, share / total_share * args.budget)
        print(f"gpu-check: {name} (budget {mine:.0f} s)", flush=True)
        results[name] = fn(mine)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = time.time() - start
    text = table(results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text(f"# gpu-check on {results['device']} (torch {results['torch']})\n\n{text}\n")
    print(text)
    print(f"gpu-check: {results['seconds']:.0f} s; {out / 'gpu_check.md'}")
    return 0 if all(v.get("ok", True) for v in results.values() if isinstance(v, dict) and "ok" in v) else 1


if __name__ == "__main__":
    sys.exit(main())
