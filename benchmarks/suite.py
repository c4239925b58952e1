"""Runs a preset: measured cells, computed (full-size, fake-tensor) cells, ratios, speed check, DeepSpeed row.

Every number in the result carries where it came from: "measured" (a real step on this device) or
"computed" (analytic formula, or an exact count on fake tensors; no time is ever computed).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import torch
from tqdm import tqdm

from vmae_ds.attention import flash_attn_available
from vmae_ds.flops import decoder_kept_tokens, encoder_visible_tokens
from vmae_ds.models import get_spec

from .computed import analytic_flops, fake_step, num_params
from .memory_search import ADAMW_BYTES_PER_PARAM, estimate_max_batch, search_max_batch
from .presets import Preset
from .step import MASKINGS, Cell, measure_cuda, measure_interleaved

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def available_kernels(wanted: tuple[str, ...], device: torch.device) -> list[str]:
    ok = {"math", "sdpa"} | ({"flash_attn"} if device.type == "cuda" and flash_attn_available() else set())
    return [k for k in wanted if k in ok]


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Suite:
    def __init__(self, preset: Preset, device: torch.device, amp: torch.dtype | None,
                 peak_tflops: float | None, budget_bytes: float, progress: bool = True):
        self.p, self.device, self.amp = preset, device, amp
        self.peak = peak_tflops if peak_tflops is not None else device_peak_tflops(device)
        self.budget = budget_bytes
        self.kernels = available_kernels(preset.kernels, device)
        self._flops: dict[tuple, dict] = {}
        self._fake: dict[Cell, dict] = {}  # the FLOP-counting fake run also gives its cell's bytes
        self.progress = progress

    def flops(self, cell: Cell) -> dict:
        key = (cell.model, cell.masking, cell.num_frames)
        if key not in self._flops:
            base = replace(cell, kernel="math", ckpt="off", batch=1)
            run = self._fake[base] = fake_step(base, self.amp, count_flops=True)
            counted = {k: run[k] for k in ("fwd_flops_per_clip", "train_flops_per_clip")}
            self._flops[key] = {"analytic": analytic_flops(base), "counted": counted}
        return self._flops[key]

    def _row(self, cell: Cell, source: str, numbers: dict) -> dict:
        f = self.flops(cell)
        spec = get_spec(cell.model, **cell.overrides())
        row = {**cell.to_dict(), "frames": spec.num_frames, "source": source, "num_params": num_params(cell), **numbers,
               "flops": f, "tokens": {"encoder": encoder_visible_tokens(spec, 0.9),
                                      "decoder": encoder_visible_tokens(spec, 0.9)
                                      + decoder_kept_tokens(spec, cell.decoder_mask, 0.9, 0.5)}}
        row["activation_bytes_per_clip"] = row["saved_activation_bytes"] / cell.batch
        if "clips_per_s" in row:
            model_flops = f["analytic"]["train_flops_per_clip"]  # 3x forward, recompute not counted
            row["tflops"] = model_flops * row["clips_per_s"] / 1e12
            row["mfu"] = row["tflops"] / self.peak if self.peak else None
        return row

    def _pairs(self, sizes: dict[str, tuple[int, int | None]]) -> list[list[Cell]]:
        return [[Cell(m, mk, k, ck, b, f) for mk in MASKINGS]
                for (m, (b, f)), k, ck in itertools.product(sizes.items(), self.kernels, self.p.ckpt)]

    def run(self, bar: tqdm, on_pair: Callable[[list[dict]], None] | None = None) -> dict:
        """Measured then computed cells; `on_pair` gets the measured rows so far after every pair (a run cut
        short by a time limit still leaves its ratios)."""
        measured: list[dict] = []
        off: dict[tuple, dict] = {}
        for pair in self._pairs(self.p.measure):
            bar.set_postfix_str(f"measure {pair[0].model}/{pair[0].kernel}/ckpt-{pair[0].ckpt}")
            if self.device.type == "cuda":
                results = [measure_cuda(c, self.device, self.amp, self.p.warmup, self.p.steps) for c in pair]
                if self.p.search_max_batch:
                    for c, r in zip(pair, results):
                        r.update(search_max_batch(c, self.device, self.amp))
            else:
                results = measure_interleaved(pair, self.device, self.amp, self.p.warmup, self.p.steps)
            for c, r in zip(pair, results):
                measured.append(self._with_estimate(self._row(c, "measured", r), off))
            if on_pair is not None:
                on_pair(measured)
            bar.update(1)
        computed: list[dict] = []
        for m in self.p.compute:
            for k, ck, mk in itertools.product([k for k in self.kernels if k != "flash_attn"], self.p.ckpt, MASKINGS):
                bar.set_postfix_str(f"compute {m}/{k}/ckpt-{ck}")
                cell = Cell(m, mk, k, ck, 1)
                self.flops(cell)  # fills the cache for the (math, off) cell first
                numbers = self._fake.get(cell) or fake_step(cell, self.amp)
                computed.append(self._with_estimate(self._row(cell, "computed", numbers), off))
            bar.update(1)
        return {"measured": measured, "computed": computed}

    def _with_estimate(self, row: dict, off: dict[tuple, dict]) -> dict:
        """Bytes-only working set per clip and the largest micro-batch it allows in `budget` (computed).

        With checkpointing, one block is recomputed at a time: its bytes come from the same cell without
        checkpointing (`off` remembers those rows; the preset runs ckpt off before on)."""
        key = (row["source"], row["model"], row["kernel"], row["masking"], row["batch"], row["num_frames"])
        if row["ckpt"] == "off":
            off[key] = row
        off_row = off.get(key)
        per_clip = row["activation_bytes_per_clip"]
        if row["ckpt"] == "on" and off_row is not None:
            per_clip += off_row["max_block_bytes"] / off_row["batch"]  # one block recomputed at a time
        row["working_set_bytes_per_clip"] = per_clip
        static = row["weight_cast_bytes"]  # batch-independent; AdamW state is added by estimate_max_batch
        row["max_batch_estimate"] = estimate_max_batch(row["num_params"], per_clip, self.budget - static)
        row["static_bytes"] = static + ADAMW_BYTES_PER_PARAM * row["num_params"]
        return row

    def total_steps(self) -> int:
        return len(self._pairs(self.p.measure)) + len(self.p.compute) + (1 if self.p.ds else 0)
