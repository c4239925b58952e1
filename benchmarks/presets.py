"""Named benchmark plans: which sizes run for real, which are computed at full size, how many steps."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    description: str
    measure: dict[str, tuple[int, int | None]]  # size -> (micro-batch, frames; None = the model's 16)
    compute: tuple[str, ...]  # sizes computed at real size on fake tensors (saved bytes, FLOPs)
    kernels: tuple[str, ...] = ("math", "sdpa", "flash_attn")  # those unavailable on the device are skipped
    ckpt: tuple[str, ...] = ("off", "on")
    warmup: int = 1  # the first warm-up step is the one whose saved tensors are counted
    steps: int = 3
    ds: tuple[str, int] | None = None  # (size, micro-batch) of the DeepSpeed ZeRO-3 bf16 row
    search_max_batch: bool = False  # CUDA only
    # torch CPU threads; None = torch's default. On a shared 2-core machine, 2 OpenMP threads stall at every
    # barrier when a neighbour takes a core (steps swing 10x); one thread is slower but steady.
    threads: int | None = None
    notes: list[str] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        "CPU-sized run for `make bench`: debug, S and B timed at micro-batch 4/1/1 (16 frames), L, H and g "
        "computed at full size, DeepSpeed ZeRO-3 on the debug model; one CPU thread.",
        measure={"debug": (4, None), "S": (1, None), "B": (1, None)},
        compute=("L", "H", "g"), warmup=1, steps=3, ds=("debug", 2), threads=1),
    "gpu": Preset(
        "Full GPU run: every size timed at 16 frames, max micro-batch searched per cell, ViT-g under DeepSpeed.",
        measure={"S": (32, None), "B": (16, None), "L": (8, None), "H": (4, None), "g": (4, None)},
        compute=("S", "B", "L", "H", "g"), warmup=3, steps=10, ds=("g", 16), search_max_batch=True),
    "smoke": Preset(
        "Seconds-long check of every code path on the debug model (tests use it).",
        measure={"debug": (2, None)}, compute=("debug",), kernels=("math", "sdpa"), warmup=0, steps=1,
        ds=None),
}
