"""`make gpu-check`: everything that needs a GPU, in one command, one table, under 8 minutes on one H100/H200.

Stages, in this order (each a subprocess with its own time budget; a stage that fails or runs out of time is
reported as such, with what it measured before, and the next one runs):
  engine     training runs under the engine on synthetic clips kept on the device (data.synthetic.resident: no host
             work, as a pinned batch would arrive), bf16, one per --runs entry SIZE:STAGE:CKPT[:OPTION...]
             (default: ViT-g with checkpointing auto and full, each also with DeepSpeed's per-bucket synchronize
             (overlap), the faster of the two plus torch.compile, and ViT-B without checkpointing): clips/s, MFU
             (and over forward + backward only), peak / reserved memory next to the estimate made at start,
             step split (next batch / forward / backward / optimizer), start-up seconds, host syncs a step
             (debug.sync_report), the error line of a failed run
  authors    the same ViT-g step the authors' way: fp16 autocast + grad scaler, eager math attention, every block
             checkpointed, plain PyTorch: the speedup is a ratio of two numbers from this one run
  bench      vmae-bench for ViT-B and ViT-g: sdpa and math, dual vs encoder-only, checkpointing off, peak memory
             (its own report in OUT/bench)
  tests      the `gpu`-marked tests (kernel parity incl. head dim 88, bf16 weights as training uses them, the
             host-sync-free step under torch.cuda.set_sync_debug_mode)
  umt        UMT-B's step (CLIP ViT-B/16 teacher with random weights) under the engine
  loader     ViT-B under the engine on real shards (320p H.264, num_workers = the machine's cores): data wait
  nvdec      backend nvdec (GPU decoding) vs backend pyav on the machine's cores, same --reencode shards: samples/s
             and decoded clips/s of the loader alone, and the data wait of a ViT-B run fed each way (by default
             only where PyNvVideoCodec is installed; --only nvdec runs it anyway, the pyav half without CUDA)

Below the table: the issue's targets (ViT-g MFU >= 45 %, ViT-B >= 40 %, >= 2.5x the authors' clips/s) next to
the best run of each. Without CUDA it says so in one line and exits 2. Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


# the step's sync check and kernel parity first; the CLI test (a subprocess with a max-batch search) is left to
# `pytest -m gpu`, it took most of the stage's budget on the H200
GPU_TEST_FILES = ["tests/test_gpu_step.py", "tests/test_attention.py", "tests/test_augment.py",
                  "tests/test_data_nvdec.py", "tests/test_bench_gpu.py"]
GPU_TEST_SKIP = ["tests/test_bench_gpu.py::test_cli_on_cuda_with_deepspeed_row"]


def _decoder() -> str:
    """The shard decoder this machine has: decord (decord2) when importable, else PyAV (the GPU wheelhouse may
    carry only one, to stay under its size limit)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return "pyav"
    return "decord"


def stage_tests(out: Path, budget: float) -> dict:  # on a CPU the same command skips every test
    skip = [a for t in GPU_TEST_SKIP for a in ("--deselect", t)]
    code, s = _run([sys.executable, "-m", "pytest", "-q", "-rf", "--tb=line", "-m", "gpu", *GPU_TEST_FILES, *skip,
                    "-p", "no:cacheprovider", "--continue-on-collection-errors"], budget, out / "tests.log")
    tail = (out / "tests.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    return {"ok": code == 0, "seconds": s, "summary": tail[0], "timed_out": code is None}


def stage_bench(out: Path, budget: float, smoke: bool = False) -> dict:
    if smoke:
        plan = ["--preset", "cpu", "--models", "debug", "--steps", "1", "--kernels", "sdpa", "--ckpt", "off"]
    else:  # the engine stage runs ViT-g under DeepSpeed; a max-batch search of every cell would not fit the budget
        plan = ["--preset", "gpu", "--models", "B", "g", "--steps", "3", "--warmup", "1", "--kernels", "sdpa", "math",
                "--ckpt", "off", "--no-ds", "--no-search-max-batch", "--compute", "--quiet"]
    cmd = [sys.executable, "-m", "benchmarks", *plan, "--out", str(out / "bench")]
    code, s = _run(cmd, budget, out / "bench.log")
    folder = out / "bench"
    reports = sorted(p for p in folder.glob("*.json") if p.name != "partial.json") if folder.is_dir() else []
    res = {"ok": code == 0, "seconds": s, "timed_out": code is None, "report": str(reports[-1]) if reports else None}
    source = reports[-1] if reports else folder / "partial.json"  # a run cut short leaves the pairs it finished
    if source.exists():
        keep = ("model", "kernel", "ckpt", "batch", "time", "time_no_optimizer", "peak", "paper_time")
        res["ratios"] = [{k: r.get(k) for k in keep} for r in json.loads(source.read_text()).get("ratios", [])
                         if r.get("source", "measured") == "measured"]
    return res


def _engine(out: Path, name: str, budget: float, overrides: list[str], config: str, skip: int = 5) -> dict:
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "vmae_ds.pretrain", "--config", config, f"name={name}",
           f"output_dir={out / 'runs'}", "logging.every_steps=10", "logging.breakdown=true",
           "logging.tensorboard=false", "checkpoint.every_steps=100000", "checkpoint.at_end=false",
           "debug.sync_report=true", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    log = out / f"{name}.log"
    code, s = _run(cmd, budget, log, env)
    res = {"ok": code == 0, "seconds": s, "timed_out": code is None}
    text = log.read_text(errors="replace") if log.exists() else ""
    ready = re.search(r"engine ready in ([0-9.]+) s", text)
    if ready:
        res["startup_s"] = float(ready.group(1))
    syncs = re.search(r"host syncs in steps \d+-\d+: \d+ \(([0-9.]+) a step\): (.*)", text)
    if syncs:  # every host-device sync of steps 3-5 (torch.cuda.set_sync_debug_mode), by where it was made
        res["syncs_per_step"], res["sync_sources"] = float(syncs.group(1)), syncs.group(2).strip()
    if code not in (0, None):  # the reason in one line (an out-of-memory, a config error, ...)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        res["error"] = next((ln for ln in reversed(lines) if "Error" in ln or "error:" in ln), (lines or ["?"])[-1])
    plan = re.search(r"memory estimate \(per device, micro-batch \d+ samples\): peak ([0-9.]+) GiB with "
                     r"checkpointing ([a-z]+(?: \d+)?)", text)
    if plan:  # what the memory plan predicted (and, with auto, chose) before anything was built
        res["estimate_gib"], res["ckpt_used"] = float(plan.group(1)), plan.group(2)
    if (run_dir / "metrics.jsonl").exists():
        res.update(_metrics(run_dir, skip))
    split = res.get("split") or {}
    if res.get("mfu") and split.get("forward", 0) + split.get("backward", 0) > 0:
        # the same FLOPs over the forward + backward time only: what the optimizer phase costs, as a number
        res["mfu_fwd_bwd"] = res["mfu"] / (split["forward"] + split["backward"])
    return res


SMOKE = ["model.name=vit_tiny_debug", "masks.encoder_ratio=0.75", "model.attention=sdpa"]
RECIPES = {"g": "configs/pretrain/vit_giant_hybrid.yaml", "B": "configs/pretrain/vit_base_hybrid.yaml"}
# auto first (the recipe's default: on a 141 GB card the memory plan expects ViT-g's 128 samples to fit without
# recompute), then every block checkpointed; each again with DeepSpeed's per-bucket synchronize (overlap: what ran
# before the world-size-1 default turned it off); `best` is the faster checkpointing of the g runs before it
ENGINE_RUNS = ("g:2:auto", "g:2:full", "g:2:auto:overlap", "g:2:full:overlap", "g:2:best:compile", "B:2:none")


# options after SIZE:STAGE:CKPT, each one change against the defaults, so its effect is a ratio of two runs
RUN_OPTIONS = {"compile": ["speed.compile=true"], "unfused": ["optim.fused=false"],
               "dschecks": ["speed.fused_grad_checks=false"], "fp32comm": [], "overlap": ["speed.overlap_comm=true"]}


def parse_run(spec: str) -> tuple[str, list[str], dict]:
    """'SIZE:STAGE:CKPT[:OPTION...]' -> (name, run-config overrides, DeepSpeed JSON additions).

    CKPT: auto (the memory plan's choice) | none | full | selN (the first N encoder blocks) | best (the faster of
    the earlier runs of the same size, resolved by stage_engine). OPTION: compile (torch.compile the blocks),
    unfused (AdamW without the fused kernel), dschecks (DeepSpeed's per-tensor gradient checks), fp32comm (gradients
    reduced in fp32: DeepSpeed's communication_data_type), overlap (DeepSpeed's overlap_comm on, with its
    device synchronize per gradient bucket, also at world size 1)."""
    parts = spec.split(":")
    if len(parts) < 3 or parts[0] not in RECIPES or parts[1] not in ("1", "2", "3"):
        raise argparse.ArgumentTypeError(f"engine run {spec!r}: expected SIZE:STAGE:CKPT[:OPTION...] with SIZE in "
                                         f"{sorted(RECIPES)}, STAGE 1/2/3, CKPT auto/none/full/selN/best, "
                                         f"e.g. g:2:auto")
    size, stage, ckpt, *options = parts
    over = [f"deepspeed_config=ds_configs/zero{stage}.json"]
    if ckpt in ("auto", "none", "full"):
        over.append(f"activation_checkpointing.mode={ckpt}")
    elif ckpt == "best":
        pass  # stage_engine substitutes the measured winner before the run
    elif ckpt.startswith("sel") and ckpt[3:].isdigit() and int(ckpt[3:]) > 0:
        over += ["activation_checkpointing.mode=selective", f"activation_checkpointing.num_blocks={ckpt[3:]}"]
    else:
        raise argparse.ArgumentTypeError(f"engine run {spec!r}: CKPT must be auto, none, full, selN (N >= 1) or best")
    for opt in options:
        if opt not in RUN_OPTIONS:
            raise argparse.ArgumentTypeError(f"engine run {spec!r}: unknown option {opt!r} (known: "
                                             f"{', '.join(RUN_OPTIONS)})")
        over += RUN_OPTIONS[opt]
    if "compile" in options and stage == "3":
        raise argparse.ArgumentTypeError(f"engine run {spec!r}: compile does not work with ZeRO-3 (DeepSpeed's "
                                         f"partitioned linear cannot be traced); use stage 1 or 2")
    ds_extra = {"communication_data_type": "fp32"} if "fp32comm" in options else {}
    return spec.replace(":", "_"), over, ds_extra


def _run_spec(spec: str) -> str:
    parse_run(spec)  # a typo fails here, in one line, before any stage runs
    return spec


def stage_engine(out: Path, budget: float, steps: int, batch: int, runs: tuple[str, ...] = ENGINE_RUNS,
                 smoke: bool = False) -> dict:
    """Each run under the engine on synthetic clips held in memory; the budget split evenly."""
    results, t0 = {}, time.time()
    for i, spec in enumerate(runs):
        spec = resolve_best(spec, results)
        name, over, ds_extra = parse_run(spec)
        size, stage = spec.split(":")[:2]
        if ds_extra:  # the stage's JSON plus the option, written next to the report (the last override wins)
            from vmae_ds.engine.ds_setup import load_ds_json

            path = out / f"{name}.ds.json"
            path.write_text(json.dumps({**load_ds_json(f"ds_configs/zero{stage}.json"), **ds_extra}, indent=1))
            over = [*over, f"deepspeed_config={path}"]
        common = ["data.kind=synthetic", "data.synthetic.num_videos=64", "data.synthetic.resident=true",
                  f"optim.max_steps={steps}",
                  *([f"optim.batch_size={batch}"] if size == "g" else []), *(SMOKE if smoke else [])]
        share = (budget - (time.time() - t0)) / (len(runs) - i)
        results[spec] = _engine(out, name, share, [*over, *common], RECIPES[size])
    return results


def resolve_best(spec: str, results: dict) -> str:
    """SIZE:STAGE:best[:...] -> the checkpointing of the fastest earlier run of that size (as the memory plan
    resolved it for auto); auto when none has finished."""
    size, stage, ckpt, *options = spec.split(":")
    if ckpt != "best":
        return spec
    done = [(e.get("clips_per_s") or 0, e.get("ckpt_used") or k.split(":")[2]) for k, e in results.items()
            if k.startswith(f"{size}:") and e.get("ok")]
    used = max(done)[1] if done else "auto"
    used = {"none": "none", "full": "full"}.get(used, "sel" + used.split()[-1] if used.startswith("selective")
                                                else "auto")
    return ":".join([size, stage, used, *options])


def stage_authors(out: Path, budget: float, batch: int, steps: int, smoke: bool = False) -> dict:
    extra = ["--model", "debug", "--device", "cpu"] if smoke else ["--model", "g"]
    code, s = _run([sys.executable, "-m", "benchmarks.authors_step", *extra, "--batch", str(batch),
                    "--steps", str(steps), "--warmup", "1", "--out", str(out / "authors.json")], budget,
                   out / "authors.log")
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


def _real_shards(out: Path, smoke: bool, reencode: bool = False) -> tuple[Path | None, str | None]:
    """48 synthetic 320p H.264 clips of 96 frames (made once) built into shards once, as stored or with
    `--reencode` (non-reference B-frames: what the fast CPU path and NVDEC read); (folder, None) or (None, the
    error line)."""
    workers = max(1, (os.cpu_count() or 2) - 2)
    videos, shards, manifest = out / "videos", out / ("shards_re" if reencode else "shards"), out / "videos.jsonl"
    steps = []
    if not (videos / "done").exists():
        steps.append(["synth", "--out", str(videos), "--n", "48", "--frames", "96", "--size",
                      "48x64" if smoke else "320x426"])
    if not manifest.exists():
        steps.append(["manifest", str(videos), "--out", str(manifest)])
    if not (shards / "index.json").exists():
        steps.append(["build", "--manifest", str(manifest), "--out", str(shards), "--workers", str(workers),
                      "--shard-size", "8", "--backend", _decoder(), "--quiet", *(["--reencode"] if reencode else [])])
    for args in steps:
        r = subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            return None, (r.stderr.strip().splitlines() or ["?"])[-1]
        if args[0] == "synth":
            (videos / "done").touch()
    return shards, None


def stage_loader(out: Path, budget: float, steps: int, smoke: bool = False) -> dict:
    """ViT-B under the engine on real 320p H.264 shards, with as many decode workers as the machine has cores
    to spare: the data wait says whether the loader keeps the GPU fed."""
    t0 = time.time()
    workers = max(1, (os.cpu_count() or 2) - 2)
    shards, error = _real_shards(out, smoke)
    if error:
        return {"ok": False, "error": error}
    backend = _decoder()
    over = [*SMOKE, "optim.batch_size=2"] if smoke else []
    res = _engine(out, "b_shards", budget - (time.time() - t0),
                  ["data.kind=shards", f"data.shards.shards={shards}", f"data.shards.num_workers={workers}",
                   f"data.shards.backend={backend}", f"optim.max_steps={steps}", *over],
                  "configs/pretrain/vit_base_hybrid.yaml")
    res["workers"] = workers
    return res


def stage_nvdec(out: Path, budget: float, steps: int, smoke: bool = False) -> dict:
    """GPU decoding (backend nvdec) against the CPU path (backend pyav, the machine's cores as workers) on the
    same --reencode shards: samples/s and decoded clips/s of the loader alone (benchmarks.loader_bench), then the
    data-wait share of a ViT-B run fed each way. Without CUDA (--smoke) only the CPU path runs."""
    t0 = time.time()
    workers = max(1, (os.cpu_count() or 2) - 2)
    shards, error = _real_shards(out, smoke, reencode=True)
    if error:
        return {"ok": False, "error": error}
    import torch

    backends = ["pyav", "nvdec"] if torch.cuda.is_available() else ["pyav"]
    bench = out / "nvdec_loader.json"
    size = ["--input-size", "32", "--num-frames", "4", "--batch-size", "4"] if smoke else ["--batch-size", "64"]
    code, s = _run([sys.executable, "-m", "benchmarks.loader_bench", "--shards", str(shards), "--pipelines", "ours",
                    "--backend", *backends, "--workers", str(workers), "--batches", "3" if smoke else "20",
                    "--warmup", "1" if smoke else "3", "--rounds", "1", *size, "--json", str(bench)],
                   budget / 3, out / "nvdec_loader.log")
    res: dict = {"ok": code == 0, "seconds": s, "timed_out": code is None, "workers": workers,
                 "backends": backends, "loader": {}}
    if bench.exists():
        for name, r in json.loads(bench.read_text()).items():
            backend = name.split(", ")[1]  # "ours, pyav"
            res["loader"][backend] = {"samples_per_s": r["clips_per_s"], "cores_used": r["cores_used"],
                                      "clips_per_s": r["clips_per_s"] / (1 if smoke else 4)}
    over = [*SMOKE, "optim.batch_size=2"] if smoke else []
    res["engine"] = {}
    for i, backend in enumerate(backends):
        share = (budget - (time.time() - t0)) / (len(backends) - i)
        nw = workers if backend != "nvdec" else min(workers, 4)  # nvdec workers only read and plan
        e = _engine(out, f"b_{backend}", share,
                    ["data.kind=shards", f"data.shards.shards={shards}", f"data.shards.num_workers={nw}",
                     f"data.shards.backend={backend}", f"optim.max_steps={steps}", *over],
                    "configs/pretrain/vit_base_hybrid.yaml")
        res["engine"][backend] = {**e, "workers": nw}
        res["ok"] = res["ok"] and e.get("ok", False)
    return res


def fmt(x: float | None, pct: bool = False) -> str:
    return "n/a" if x is None else (f"{x * 100:.1f}%" if pct else f"{x:.1f}")


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def table(results: dict) -> str:
    rows = ["| check | result | clips/s | MFU (fwd+bwd only) | peak / reserved GiB (estimate) | start-up s | notes |",
            "|---|---|---|---|---|---|---|"]

    on_gpu = not str(results.get("device", "")).startswith("cpu")

    def engine_row(label: str, e: dict, notes: str) -> str:
        mfu = fmt(e.get("mfu"), True) + (f" ({fmt(e['mfu_fwd_bwd'], True)})" if e.get("mfu_fwd_bwd") else "")
        est = e.get("estimate_gib")
        # the CPU's peak is the process's resident memory, not what the plan estimates (device tensors)
        off = f", {(e['peak_gib'] - est) / est:+.0%}" if on_gpu and est and e.get("peak_gib") else ""
        return (f"| {label} | {_status(e)} | {fmt(e.get('clips_per_s'))} | {mfu} | {fmt(e.get('peak_gib'))} / "
                f"{fmt(e.get('reserved_gib'))} ({fmt(est)}{off}) | {fmt(e.get('startup_s'))} | {notes} |")

    t = results.get("tests", {})
    rows.append(f"| gpu tests | {_status(t, 'pass')} | | | | | {t.get('summary', '')} |")
    b = results.get("bench", {})
    rows.append(f"| vmae-bench B, g | {_status(b, 'done')} | | | | | report {b.get('report')} |")
    for r in b.get("ratios", []):  # encoder-only / dual: > 1 means dual masking is faster / smaller
        rows.append(f"| encoder-only / dual, ViT-{r['model']} {r['kernel']} ckpt {r['ckpt']} b{r['batch']} | "
                    f"{times(r.get('time'))} time | | | {times(r.get('peak'))} peak | | paper "
                    f"{times(r.get('paper_time'))}; {times(r.get('time_no_optimizer'))} without the optimizer step |")
    engine = results.get("engine", {})
    for spec, e in engine.items():
        size, stage, ckpt, *extra = spec.split(":")
        split = " ".join(f"{k.replace('_', ' ')} {v * 100:.0f}%" for k, v in e.get("split", {}).items())
        used = f" -> {e['ckpt_used']}" if ckpt == "auto" and e.get("ckpt_used") else ""
        label = f"ViT-{size} ZeRO-{stage} bf16, ckpt {ckpt}{used}" + "".join(f", {x}" for x in extra)
        notes = split + (f"; {e['syncs_per_step']:g} host syncs a step" if e.get("syncs_per_step") is not None else "")
        rows.append(engine_row(label, e, notes + (f"; {e['error']}" if e.get("error") else "")))
    a = results.get("authors", {})
    rows.append(f"| ViT-g authors' config | {_status(a)} | {fmt(a.get('clips_per_s'))} | | {fmt(a.get('peak_gib'))} "
                f"| | fp16 autocast, math attention, every block checkpointed |")
    u = results.get("umt", {})
    rows.append(engine_row("UMT-B ZeRO-2 bf16", u, f"MFU with teacher {fmt(u.get('mfu_with_teacher'), True)}"))
    ld = results.get("loader", {})
    wait = ld.get("data_wait")
    rows.append(engine_row("ViT-B on real shards", ld, f"{ld.get('workers')} workers, data wait "
                                                       f"{'n/a' if wait is None else f'{wait * 100:.0f}%'}"))
    nv = results.get("nvdec", {})
    for backend in ("pyav", "nvdec"):
        ld, e = nv.get("loader", {}).get(backend), nv.get("engine", {}).get(backend)
        if nv and backend not in nv.get("backends", []):
            rows.append(f"| decode {backend} | not run | | | | | no CUDA device |")
            continue
        if ld or e:
            wait = (e or {}).get("data_wait")
            where = "GPU (NVDEC)" if backend == "nvdec" else f"CPU, {nv.get('workers')} workers"
            rows.append(f"| decode {backend} ({where}) | {_status(e or {})} | {fmt((e or {}).get('clips_per_s'))} | "
                        f"| | | loader alone: {fmt((ld or {}).get('samples_per_s'))} samples/s = "
                        f"{fmt((ld or {}).get('clips_per_s'))} decoded clips/s, {fmt((ld or {}).get('cores_used'))} "
                        f"CPU cores; ViT-B fed by it: data wait {'n/a' if wait is None else f'{wait * 100:.0f}%'} |")
    rows += ["", *targets(results)]
    return "\n".join(rows)


def targets(results: dict) -> list[str]:
    """The issue's targets next to the best measured run of each."""
    engine = results.get("engine", {})

    def best(size: str, key: str) -> float | None:
        vals = [e.get(key) for spec, e in engine.items() if spec.startswith(f"{size}:") and e.get(key)]
        return max(vals) if vals else None

    g_mfu, b_mfu, g_clips = best("g", "mfu"), best("B", "mfu"), best("g", "clips_per_s")
    authors = results.get("authors", {}).get("clips_per_s")
    speedup = g_clips / authors if g_clips and authors else None

    def line(what: str, got: float | None, want: float, unit: str) -> str:
        show = (lambda x: fmt(x, pct=True)) if unit == "%" else times
        if got is None:
            return f"- {what}: not measured (target {show(want)})"
        return f"- {what}: {show(got)} ({'meets' if got >= want else 'below'} the target {show(want)})"

    return [line("ViT-g MFU, best run", g_mfu, TARGETS["g_mfu"], "%"),
            line("ViT-B MFU, best run", b_mfu, TARGETS["b_mfu"], "%"),
            line("ViT-g clips/s over the authors' configuration", speedup, TARGETS["g_speedup"], "x")]


def _status(stage: dict, ok: str = "ok") -> str:
    if stage.get("ok") is None:
        return "not run"
    return ok if stage["ok"] else ("TIMEOUT" if stage.get("timed_out") else "FAIL")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/gpu_check", help="report folder (default reports/gpu_check)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for everything (default 470, < 8 min; 900 with --smoke: 2 CPU cores are slower)")
    p.add_argument("--only", nargs="*", choices=("tests", "bench", "engine", "authors", "umt", "loader", "nvdec"),
                   help="run only these stages")
    p.add_argument("--g-batch", type=int, default=32, help="ViT-g clips per micro-step (x num_sample 4)")
    p.add_argument("--steps", type=int, default=12, help="engine steps per run (the first 5 are warm-up)")
    p.add_argument("--runs", nargs="+", type=_run_spec, default=list(ENGINE_RUNS), metavar="SIZE:STAGE:CKPT",
                   help="engine runs, SIZE g or B, ZeRO STAGE 1/2/3, CKPT none / full / selN (the first N encoder "
                   f"blocks), then options: {', '.join(RUN_OPTIONS)} (see parse_run); default: "
                   f"{' '.join(ENGINE_RUNS)}")
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
    args.budget = args.budget or (900 if sm else 470)
    # shares from the first H200 runs: a ViT-g engine run needs ~40 s to start and ~1 s a step at 128 samples;
    # the engine comes first: if the machine is taken back early, its numbers are the ones that matter
    # six engine runs of ~40 s start-up and 12 steps each take the most; what answers the targets comes first
    plan = [("engine", 300, lambda b: stage_engine(out, b, args.steps, args.g_batch, tuple(args.runs), sm)),
            ("authors", 40, lambda b: stage_authors(out, b, args.g_batch, 4 if not sm else 1, sm)),
            ("bench", 45, lambda b: stage_bench(out, b, sm)),
            ("tests", 30, lambda b: stage_tests(out, b)),
            ("umt", 25, lambda b: stage_umt(out, b, args.steps, sm)),
            ("loader", 30, lambda b: stage_loader(out, b, 12 if not sm else 3, sm)),
            ("nvdec", 90, lambda b: stage_nvdec(out, b, 12 if not sm else 3, sm))]
    # nvdec by default only where PyNvVideoCodec is installed (the other stages' shares then shrink by 16 %)
    import importlib.util

    has_nvdec = importlib.util.find_spec("PyNvVideoCodec") is not None
    plan = [p for p in plan if p[0] in (args.only or []) or not args.only and (p[0] != "nvdec" or has_nvdec)]
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
    stages = [v for k, v in results.items() if isinstance(v, dict) and k != "engine"]
    stages += list(results.get("engine", {}).values())
    return 0 if all(v.get("ok", True) for v in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
