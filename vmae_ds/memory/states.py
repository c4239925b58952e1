"""Bytes per device of what DeepSpeed ZeRO keeps for training: weights, fp32 master copy, AdamW moments, gradients
and the buffers they are reduced through, at the stage, world size and precision of the run.

Two moments matter, because activations and the optimizer's working memory never coincide:
- during backward: weights + master + moments + gradients (as they accumulate) + reduction buckets;
- during the optimizer step: the same, plus the fp32 gradient partition DeepSpeed builds for the update and,
  unless AdamW is fused, its multi-tensor temporaries.
The counts below follow DeepSpeed 0.19's ZeRO optimizers and are checked against a real 2-rank engine on the
CPU (tests/test_memory_plan.py measures every live and temporary tensor with torch's memory profiler).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass
class StateBytes:
    """Bytes on one device; `step_extra` exists only during the optimizer step."""

    weights: int
    master: int
    moments: int
    grads: int
    buffers: int
    step_extra: int

    @property
    def backward(self) -> int:
        return self.weights + self.master + self.moments + self.grads + self.buffers

    @property
    def step(self) -> int:
        return self.backward + self.step_extra

    def line(self) -> str:
        parts = [("weights", self.weights), ("fp32 master", self.master), ("AdamW moments", self.moments),
                 ("grads", self.grads), ("buffers", self.buffers), ("step extra", self.step_extra)]
        return ", ".join(f"{name} {b / GIB:.2f}" for name, b in parts if b)


def zero_state_bytes(num_params: int, ds: dict, world: int, precision: str, fused_adam: bool,
                     largest_param: int = 0) -> StateBytes:
    """`ds`: the resolved DeepSpeed dict; `largest_param`: elements of the biggest parameter (ZeRO-3 gathers at
    least one whole parameter at a time)."""
    zo = ds.get("zero_optimization", {})
    stage = int(zo.get("stage", 0))
    low = 2 if precision == "bf16" else 4  # bytes of the trained weights and their gradients
    p, part = num_params, -(-num_params // world)  # the partition every rank owns
    offload = str(zo.get("offload_optimizer", {}).get("device", "none")) not in ("none", "None")
    master = 0 if offload else 4 * part
    moments = 0 if offload else 8 * part
    # the fp32 gradient partition of the update; a foreach AdamW adds two fp32 temporaries of the partition
    step_extra = 0 if offload else 4 * part + (0 if fused_adam else 8 * part)
    bucket = int(zo.get("reduce_bucket_size", 5e8))
    if stage in (1, 2):
        weights = low * p
        if stage == 1 or world == 1:
            grads, buffers = low * p, 0  # whole gradients until the boundary (nothing to scatter at world 1)
        else:
            grads = low * part
            buffers = low * bucket * (2 if zo.get("overlap_comm") else 1)  # DeepSpeed's ipg buffer(s)
        return StateBytes(weights, master, moments, grads, buffers, step_extra)
    if stage == 3:
        weights = low * part
        live = int(zo.get("stage3_max_live_parameters", 1e9))
        prefetch = int(zo.get("stage3_prefetch_bucket_size", 5e7))
        gathered = low * max(min(p, live + prefetch), largest_param) if world > 1 else 0
        grads = 4 * part  # ZeRO-3 accumulates reduced gradients in an fp32 partition
        buffers = gathered + low * min(bucket, p)
        step_extra = 0 if offload else (0 if fused_adam else 8 * part)
        return StateBytes(weights, master, moments, grads, buffers, step_extra)
    raise ValueError(f"zero_optimization.stage must be 1, 2 or 3, got {stage}")
