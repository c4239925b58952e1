"""Report writer: one JSON (every number + environment), one Markdown report and one PNG per run.

Files are named `[models]_[hardware]_[date]` (e.g. `debug-S-B-L-H-g_cpu2_2026-11-24.md`) under --out.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

MIB = 2**20


def environment(device: torch.device, command: str) -> dict:
    """Hardware, software versions, git commit, date and the exact command of this run."""
    import deepspeed
    import timm

    hw = {"device": device.type, "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
          "torch_threads": torch.get_num_threads()}
    try:
        import psutil
        hw["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
    sw = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
          "timm": timm.__version__, "cuda": torch.version.cuda}
    try:
        import flash_attn
        sw["flash_attn"] = flash_attn.__version__
    except ImportError:
        sw["flash_attn"] = None
    return {"hardware": hw, "software": sw, "git": _git(), "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain", "--", "."))}
    except OSError:
        return {"commit": None, "dirty": None}


def hardware_slug(env: dict) -> str:
    hw = env["hardware"]
    if hw["device"] == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", hw["gpu"].lower()).strip("-")
    return f"cpu{hw['cpu_cores']}"


def report_stem(result: dict) -> str:
    models = "-".join(dict.fromkeys(result["models"]))
    return f"{models}_{hardware_slug(result['env'])}_{result['env']['date'][:10]}"


def _f(x: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x / scale, spec)


def _cap(batch: int, limit: int = 4096) -> str:
    return f">{limit}" if batch > limit else str(batch)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def measured_table(rows: list[dict]) -> str:
    head = ["model", "frames", "batch", "masking", "kernel", "ckpt", "step ms", "ms/clip",
            "train GFLOP/clip (analytic / counted)", "TFLOP/s", "MFU", "saved act MiB/clip", "weight casts MiB",
            "peak MiB", "max batch"]
    body = [[r["model"], str(r["frames"]), str(r["batch"]), r["masking"], r["kernel"], r["ckpt"],
             _f(r["step_time_s"] * 1e3, ".0f"), _f(r["time_per_clip_s"] * 1e3, ".0f"),
             f"{_f(r['flops']['analytic']['train_flops_per_clip'], '.4g', 1e9)} / "
             f"{_f(r['flops']['counted']['train_flops_per_clip'], '.4g', 1e9)}",
             _f(r.get("tflops"), ".3f"), _f(r.get("mfu"), ".1%"), _f(r["activation_bytes_per_clip"], ".1f", MIB),
             _f(r["weight_cast_bytes"], ".1f", MIB), _f(r.get("peak_allocated_bytes"), ".0f", MIB),
             f"{r['max_batch']} (measured)" if "max_batch" in r else f"{_cap(r['max_batch_estimate'])} (computed)"]
            for r in rows]
    return _table(head, body)


def computed_table(rows: list[dict], budget_bytes: float) -> str:
    head = ["model", "masking", "kernel", "ckpt", "fwd GFLOP/clip (analytic / counted)", "paper G(MAC)s",
            "saved act MiB/clip", "largest block MiB/clip", "working set MiB/clip",
            f"max batch in {budget_bytes / 2**30:.0f} GiB"]
    paper = {("g", "encoder_only"): 263.93, ("g", "dual"): 241.61}
    body = [[r["model"], r["masking"], r["kernel"], r["ckpt"],
             f"{_f(r['flops']['analytic']['fwd_flops_per_clip'], '.4g', 1e9)} / "
             f"{_f(r['flops']['counted']['fwd_flops_per_clip'], '.4g', 1e9)}",
             _f(paper.get((r["model"], r["masking"])), ".2f"), _f(r["activation_bytes_per_clip"], ".1f", MIB),
             _f(r["max_block_bytes"] / r["batch"], ".1f", MIB), _f(r["working_set_bytes_per_clip"], ".1f", MIB),
             _cap(r["max_batch_estimate"])] for r in rows]
    return _table(head, body)


def ratio_table(rows: list[dict], explain: bool = False) -> str:
    head = ["model", "kernel", "ckpt", "source", "FLOPs", "time", "time w/o AdamW", "paper time", "saved act",
            "working set",
            "peak mem", "paper mem", "max batch dual/enc"]
    body = [[r["model"] + (f" ({r['num_frames']}f)" if r["num_frames"] else ""), r["kernel"], r["ckpt"], r["source"],
             _f(r["flops"]), _f(r["time"]), _f(r.get("time_no_optimizer")), _f(r["paper_time"]), _f(r["saved"]),
             _f(r["working_set"]),
             _f(r["peak"]), _f(r["paper_memory"], ".1f"), f"{_f(r['max_batch_gain'])} ({r['max_batch_source']})"]
            for r in rows]
    text = _table(head, body)
    if explain:
        text += "\n\n" + "\n".join(f"- **{r['model']} {r['kernel']} ckpt-{r['ckpt']} ({r['source']})**: "
                                   f"{r['explanation']}" for r in rows)
    return text


def speed_table(rows: list[dict]) -> str:
    head = ["model", "best cell", "s/clip", "vs official dual (math, ckpt all)", "vs official encoder-only",
            "target (paper)"]
    return _table(head, [[r["model"], r["best"], _f(r["best_s_per_clip"], ".3f"),
                          _f(r["speedup_vs_official_dual"]) + "x", _f(r["speedup_vs_official_encoder_only"]) + "x",
                          _f(r["target"])] for r in rows])


def ds_table(ds: dict | None) -> str:
    if not ds:
        return "(not run)"
    c = ds["cell"]
    head = ["model", "batch", "masking", "kernel", "ZeRO", "precision", "ranks", "step ms", "clips/s", "TFLOP/s",
            "MFU", "peak MiB"]
    return _table(head, [[c["model"], str(c["batch"]), c["masking"], ds["kernel_used"] or c["kernel"],
                          str(ds["zero_stage"]), ds["precision"], str(ds["world_size"]),
                          _f(ds["step_time_s"] * 1e3, ".0f"), _f(ds["clips_per_s"], ".2f"), _f(ds.get("tflops"), ".3f"),
                          _f(ds.get("mfu"), ".1%"), _f(ds.get("peak_allocated_bytes"), ".0f", MIB)]])


def summary(result: dict) -> str:
    """What `make bench` prints: measured cells, ratios, speed check, DeepSpeed row."""
    parts = ["Measured cells (" + result["precision"] + "):", measured_table(result["measured"]),
             "", "Encoder-only / dual ratios:", ratio_table(result["ratios"]),
             "", "Best cell vs official configuration (per clip):", speed_table(result["speed"]),
             "", "DeepSpeed engine:", ds_table(result.get("deepspeed"))]
    return "\n".join(parts)


def plot(result: dict, path: Path) -> None:
    """Time and saved activations per measured cell, and the ratios next to the paper's."""
    meas, ratios = result["measured"], result["ratios"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"{r['model']} {r['kernel']}\n{'ckpt' if r['ckpt'] == 'on' else 'no-ckpt'}" for r in meas[::2]]
    x = range(len(labels))
    for ax, key, scale, title in ((axes[0], "time_per_clip_s", 1e-3, "step time per clip (ms, measured)"),
                                  (axes[1], "activation_bytes_per_clip", MIB, "saved activations per clip (MiB)")):
        for j, mk in enumerate(("encoder_only", "dual")):
            vals = [r[key] / scale for r in meas if r["masking"] == mk]
            ax.bar([i + (j - 0.5) * 0.4 for i in x], vals, width=0.4, label=mk)
        ax.set_xticks(list(x), labels, fontsize=6, rotation=90)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    names = [f"{r['model']} {r['kernel']} {r['ckpt']}{' (c)' if r['source'] == 'computed' else ''}" for r in ratios]
    y = range(len(ratios))
    ax.barh([i + 0.2 for i in y], [r["time"] or 0 for r in ratios], height=0.4, color="tab:blue",
            label="time (measured)")
    ax.barh([i - 0.2 for i in y], [r["working_set"] or 0 for r in ratios], height=0.4, color="tab:gray",
            label="working set bytes")
    ax.set_yticks(list(y), names, fontsize=6)
    refs = ((1.79, "--", "paper B 1.79x"), (1.48, ":", "paper g 1.48x"), (2.0, "-.", "half memory"))
    for ratio, style, label in refs:
        ax.axvline(ratio, color="k", linestyle=style, linewidth=0.8, label=label)
    ax.set_title("encoder-only / dual ratios ((c) = computed at full size)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def markdown(result: dict, png_name: str) -> str:
    env, hw, sw = result["env"], result["env"]["hardware"], result["env"]["software"]
    where = hw.get("gpu") or f"{hw['cpu']} ({hw['cpu_cores']} cores, {hw['torch_threads']} torch threads)"
    lines = [f"# vmae-bench: {', '.join(result['models'])} on {where}", "",
             f"- date {env['date']}; git {env['git']['commit']}{' (dirty)' if env['git']['dirty'] else ''}",
             f"- command: `{env['command']}`",
             "- software: " + ", ".join(f"{k} {v}" for k, v in sw.items()),
             f"- preset `{result['preset']}`: {result['preset_description']}",
             f"- precision: {result['precision']}; timing: median of {result['steps']} steps after "
             f"{result['warmup']} warm-up ({result['timing']})",
             "- **measured** = a real training step on this machine; **computed** = analytic FLOPs or an exact "
             "count on fake tensors at full size (no time is ever computed). See benchmarks/README.md.", ""]
    lines += [*[f"- note: {n}" for n in result["notes"]], "", f"![cells and ratios]({png_name})", "",
              "## Measured cells", "", measured_table(result["measured"]), "",
              "## Full-size cells (computed)", "", computed_table(result["computed"], result["budget_bytes"]), "",
              "## Encoder-only / dual masking (paper: 1.79x B, 1.48x g, nearly half the memory)", "",
              ratio_table(result["ratios"], explain=True), "",
              "## Best cell vs the official configuration", "", speed_table(result["speed"]), "",
              "## DeepSpeed engine (ZeRO-3, bf16)", "", ds_table(result.get("deepspeed")), ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(result)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    plot(result, paths["png"])
    paths["md"].write_text(markdown(result, paths["png"].name))
    return paths
