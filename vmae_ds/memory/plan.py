"""Peak memory per device, estimated before anything is built, and the activation checkpointing that fits it.

peak = max(end of forward, backward, optimizer step), where
  end of forward = ZeRO states without gradients + micro-batch x (saved activations of the checkpointing choice
                   + 3 batches: the one computing, the one prefetched, and the loss's working copy of it, e.g.
                   MAE's pixel target, as large as the input)
  backward       = ZeRO states (states.py) + micro-batch x (saved activations + the largest block held again
                   while it is recomputed or differentiated + 2 batches)
  step           = ZeRO states with the update's fp32 gradients (and a foreach AdamW's temporaries) + 2 batches
A real 2-rank engine step on the CPU, measured with torch's memory profiler, lands within 15 % of this
(tests/test_memory_plan.py); on the GPU, gpu-check prints the estimate next to every measured peak.

`activation_checkpointing.mode: auto` takes the first choice that fits `capacity / (1 + margin)`: none, then
selective with as few leading encoder blocks as needed, then full (recompute costs a forward of each block it
covers, so fewer is faster). The margin covers the allocator's fragmentation and the estimate's own error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .activations import ActivationProfile, checkpoint_counts, profile_objective
from .states import GIB, StateBytes, zero_state_bytes


class MemoryPlanError(ValueError):
    """A configuration that cannot fit the device; the message is one line with the numbers."""


@dataclasses.dataclass
class Choice:
    mode: str
    num_blocks: int
    ckpt: dict[str, int]  # leading blocks checkpointed per stack

    @property
    def label(self) -> str:
        return f"selective {self.num_blocks}" if self.mode == "selective" else self.mode


@dataclasses.dataclass
class MemoryPlan:
    capacity: int
    capacity_source: str
    margin: float
    micro_batch: int
    states: StateBytes
    profile: ActivationProfile
    choice: Choice
    requested: str
    peaks: dict[str, int]  # candidate label -> estimated peak (bytes)
    max_micro_batch: int  # the largest micro-batch (samples) of the chosen mode that fits

    @property
    def peak(self) -> int:
        return self.peaks[self.choice.label]

    @property
    def budget(self) -> int:
        return int(self.capacity / (1 + self.margin))

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / GIB:.1f} GiB" if b >= GIB else f"{b / GIB:.3f} GiB"  # noqa: E731
        shown = ", ".join(f"{k} {gib(v)}" for k, v in self.peaks.items())
        saved = self.profile.saved(self.choice.ckpt)
        why = "chosen by activation_checkpointing.mode auto" if self.requested == "auto" else "as configured"
        return [f"memory estimate (per device, micro-batch {self.micro_batch} samples): peak {gib(self.peak)} with "
                f"checkpointing {self.choice.label} ({why}); {self.capacity_source} {gib(self.capacity)}, planned "
                f"to {gib(self.budget)} (margin {self.margin:.0%})",
                f"  ZeRO states: {self.states.line()} GiB; activations {saved / 2**20:.1f} MiB saved a sample "
                f"({self.profile.total / 2**20:.1f} without checkpointing); candidates: {shown}",
                f"  largest micro-batch that fits with checkpointing {self.choice.label}: "
                f"{self.max_micro_batch} samples"]

    def to_json(self) -> dict:
        return {"capacity_gib": self.capacity / GIB, "capacity_source": self.capacity_source, "margin": self.margin,
                "micro_batch": self.micro_batch, "choice": self.choice.label, "requested": self.requested,
                "peak_gib": self.peak / GIB, "peaks_gib": {k: v / GIB for k, v in self.peaks.items()},
                "max_micro_batch": self.max_micro_batch, "states": dataclasses.asdict(self.states)}


def _moments(states: StateBytes, profile: ActivationProfile, ckpt: dict[str, int]) -> list[tuple[int, int]]:
    """(fixed bytes, bytes per sample) at the end of forward, during backward and during the optimizer step."""
    saved, batch = profile.saved(ckpt), profile.batch_bytes
    block = max(profile.largest_block(ckpt), profile.largest_block())
    return [(states.backward - states.grads, saved + 3 * batch), (states.backward, saved + block + 2 * batch),
            (states.step, 2 * batch)]


def peak_bytes(states: StateBytes, profile: ActivationProfile, ckpt: dict[str, int], micro_batch: int) -> int:
    return max(fixed + micro_batch * per for fixed, per in _moments(states, profile, ckpt))


def max_micro_batch(states: StateBytes, profile: ActivationProfile, ckpt: dict[str, int], budget: int) -> int:
    """The largest micro-batch (samples) whose peak stays within `budget` (each moment is linear in it)."""
    return max(0, min((budget - fixed) // max(per, 1) for fixed, per in _moments(states, profile, ckpt)))


def choices(model: Any, requested: str, num_blocks: int) -> list[Choice]:
    """Candidates in order of speed (none first); only the configured one unless `requested` is auto."""
    if requested != "auto":
        return [Choice(requested, num_blocks, checkpoint_counts(model, requested, num_blocks))]
    depth = len(model.encoder.blocks) if hasattr(model, "encoder") else len(model.blocks)
    out = [Choice("none", 0, checkpoint_counts(model, "none", 0))]
    out += [Choice("selective", k, checkpoint_counts(model, "selective", k)) for k in range(1, depth + 1)]
    return out + [Choice("full", 0, checkpoint_counts(model, "full", 0))]


def plan(cfg: Any, ds: dict, world: int, objective_cls: type, capacity: int, capacity_source: str,
         margin: float, fused_adam: bool, profile: ActivationProfile | None = None) -> MemoryPlan:
    """The estimate for run config `cfg` (its DeepSpeed dict `ds`, `world` ranks) on a device of `capacity`
    bytes; raises MemoryPlanError when nothing configured (or, with auto, nothing at all) fits. `profile`: the
    run's activation profile when already counted (it depends on the model, masks and dtype only)."""
    import torch

    with torch.device("meta"):
        model = objective_cls(cfg).build_model()
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((p.numel() for p in model.parameters()), default=0)
    states = zero_state_bytes(num_params, ds, world, cfg.precision, fused_adam, largest)
    profile = profile or profile_objective(objective_cls, cfg)
    ac = cfg.activation_checkpointing
    micro = ds["train_micro_batch_size_per_gpu"]
    budget = int(capacity / (1 + margin))
    cands = choices(model, ac.mode, ac.num_blocks)
    peaks: dict[str, int] = {}
    chosen = None
    for c in cands:
        peaks[c.label] = peak_bytes(states, profile, c.ckpt, micro)
        if peaks[c.label] <= budget:
            chosen = c
            break
    shown = {k: v for k, v in peaks.items() if not k.startswith("selective") or k == (chosen or cands[-1]).label}
    if chosen is None:
        last = cands[-1]
        best = peaks[last.label]
        fits = max_micro_batch(states, profile, last.ckpt, budget)
        what = "even with every block checkpointed" if ac.mode == "auto" else f"with checkpointing {last.label}"
        hint = f"the largest micro-batch that fits is {fits} samples" if fits else \
            "the ZeRO states alone do not fit: use a higher ZeRO stage or more GPUs"
        raise MemoryPlanError(f"memory: micro-batch {micro} samples needs about {best / GIB:.1f} GiB per device "
                              f"{what} ({states.backward / GIB:.1f} GiB of it ZeRO states), more than "
                              f"{budget / GIB:.1f} GiB ({capacity_source} {capacity / GIB:.1f} GiB less a "
                              f"{margin:.0%} margin); {hint}, or lower optim.batch_size / data.num_sample")
    return MemoryPlan(capacity, capacity_source, margin, micro, states, profile, chosen, ac.mode, shown,
                      max_micro_batch(states, profile, chosen.ckpt, budget))

