"""What one training sample keeps in memory for backward, at the run's real size, counted on fake tensors.

The objective's own forward and loss run once at micro-batch 2 on fake CPU tensors (no data, no FLOPs, seconds
even for ViT-g), with the model in the dtype the engine trains it in. Autograd's saved tensors are counted per
storage and attributed to the transformer block that first saved them, together with the size of each block's
input. That is enough to price every checkpointing choice without running it: checkpointing a block keeps its
input instead of what it saved, and recomputes what it saved (one block at a time) during backward.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .fake import fake_cpu
from .saved_tensors import SavedTensorCounter, attribute_to_blocks


@dataclasses.dataclass
class ActivationProfile:
    """Bytes per sample. `stacks`: for each run of transformer blocks (encoder.blocks, decoder.blocks, ...) the
    (saved bytes inside the block, bytes of its input) of every block, in order."""

    total: int  # saved for backward without any checkpointing (blocks + everything around them + the loss)
    stacks: dict[str, list[tuple[int, int]]]
    batch_bytes: int  # the batch as the objective hands it to the model (one is computing, one is prefetched)

    def saved(self, ckpt: dict[str, int]) -> int:
        """Saved bytes when the first ckpt[stack] blocks of each stack are checkpointed."""
        return self.total - sum(inside - inp for stack, k in ckpt.items() for inside, inp in self.stacks[stack][:k])

    def largest_block(self, ckpt: dict[str, int] | None = None) -> int:
        """The most one block saves: what backward holds again while recomputing it, or the working set of the
        largest block's backward when nothing is checkpointed (`ckpt` None: over all blocks)."""
        sizes = [inside for stack, blocks in self.stacks.items()
                 for inside, _ in blocks[:(len(blocks) if ckpt is None else ckpt.get(stack, 0))]]
        return max(sizes, default=0)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def checkpoint_counts(model: nn.Module, mode: str, num_blocks: int) -> dict[str, int]:
    """How many leading blocks of each stack `model.set_activation_checkpointing(mode, num_blocks)` checkpoints
    (asked of the model itself, so the planner and the model cannot disagree)."""
    model.set_activation_checkpointing(mode, num_blocks)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "num_ckpt_blocks") and isinstance(getattr(module, "blocks", None), nn.ModuleList):
            out[f"{name}.blocks" if name else "blocks"] = int(module.num_ckpt_blocks)
    model.set_activation_checkpointing("none", 0)
    return out


def block_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    return {f"{name}.blocks" if name else "blocks": m.blocks for name, m in model.named_modules()
            if hasattr(m, "num_ckpt_blocks") and isinstance(getattr(m, "blocks", None), nn.ModuleList)}


class _RNGKept:
    """Leave the process's RNGs as they were (the profile runs before the run seeds them, but resume restores
    them first: nothing here may shift a stream)."""

    def __enter__(self) -> None:
        self.state = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.state[0])
        np.random.set_state(self.state[1])
        random.setstate(self.state[2])


PROFILE_SAMPLES = 2  # counted together (Mixup / CutMix need pairs), reported per sample


def profile_objective(objective_cls: type, cfg: Any) -> ActivationProfile:
    """Count a sample of `objective_cls` under run config `cfg` (its model, masks, dtype and loss)."""
    from ..engine.prefetch import tensors_in

    synthetic = cfg.data.synthetic.model_copy(update={"num_videos": 1, "resident": False})
    one = cfg.model_copy(update={  # PROFILE_SAMPLES synthetic samples of the run's shape (Mixup pairs samples)
        "data": cfg.data.model_copy(update={"kind": "synthetic", "num_sample": PROFILE_SAMPLES,
                                            "synthetic": synthetic}),
        "optim": cfg.optim.model_copy(update={"batch_size": 1})})
    objective = objective_cls(one)
    with _RNGKept():
        cpu = torch.device("cpu")
        objective.setup(cpu)
        batch = objective.to_device(next(iter(objective.build_loader(0, 1))))
        batch_bytes = sum(t.untyped_storage().nbytes() for t in tensors_in(batch))
        with torch.device("meta"):
            model = objective.build_model().to(objective.dtype)  # as DeepSpeed's bf16 holds it
        stacks = block_stacks(model)
        names = {f"{s}.{i}": blk for s, blocks in stacks.items() for i, blk in enumerate(blocks)}
        inputs: dict[str, int] = {}

        def note_input(name: str):
            def hook(_module: nn.Module, args: tuple) -> None:
                inputs.setdefault(name, args[0].untyped_storage().nbytes())
            return hook

        with fake_cpu() as mode:
            model = model.to_empty(device=cpu).train()
            fake = {k: mode.from_tensor(v) if k == "video" else v for k, v in batch.items()}
            counter = SavedTensorCounter([*model.parameters(), *model.buffers()])
            hooks = [blk.register_forward_pre_hook(note_input(n)) for n, blk in names.items()]
            try:
                with counter, attribute_to_blocks(counter, names):
                    objective.loss(model, fake)
            finally:
                for h in hooks:
                    h.remove()
    n = PROFILE_SAMPLES
    per_stack = {s: [(counter.bytes_by_scope.get(f"{s}.{i}", 0) // n, inputs.get(f"{s}.{i}", 0) // n)
                     for i in range(len(blocks))] for s, blocks in stacks.items()}
    return ActivationProfile(total=counter.activation_bytes // n, stacks=per_stack, batch_bytes=batch_bytes // n)
