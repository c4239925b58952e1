"""Numbers computed without running the math: analytic FLOPs, counted FLOPs and saved bytes on fake tensors.

These are exact for the real size (16 frames, 224 px) whatever the machine, and are what the report marks
"computed". Counted FLOPs use the `math` kernel: FlopCounterMode has no formula for the CPU SDPA kernel,
and model FLOPs do not depend on the kernel anyway.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from vmae_ds.flops import pretrain_flops
from vmae_ds.models import create_pretrain_model, get_spec

from .saved_tensors import SavedTensorCounter
from .shape_only import fake_cpu
from .step import Cell, forward_loss, make_batch


def analytic_flops(cell: Cell) -> dict:
    """Per clip, from vmae_ds.flops (multiply-add = 2 FLOPs); train = 3x forward, recompute not counted."""
    spec = get_spec(cell.model, **cell.overrides())
    fwd = pretrain_flops(spec, decoder_mode=cell.decoder_mask, encoder_ratio=0.9, decoder_ratio=0.5)
    return {"fwd_flops_per_clip": fwd.total, "train_flops_per_clip": 3 * fwd.total,
            "fwd_decoder_share": (fwd.decoder + fwd.head) / fwd.total}


def _fake_run(cell: Cell, kernel: str, amp: torch.dtype | None,
              counter: SavedTensorCounter | None = None) -> tuple[int, int]:
    """Real-size forward + loss + backward on fake CPU tensors; returns counted (forward, backward) FLOPs.

    With `counter`, the forward's saved tensors are counted (checkpointing as the cell says)."""
    with torch.device("meta"):
        model = create_pretrain_model(cell.model, attention=kernel, **cell.overrides())
    video, enc, dec = make_batch(model, cell, cell.batch, "cpu")  # real masks: the shadow needs their values
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with fake_cpu() as mode:
        model = model.to_empty(device="cpu").train()
        video = mode.from_tensor(video)
        if counter is not None:
            counter.exclude([*model.parameters(), *model.buffers()])
            model.set_activation_checkpointing("full" if cell.ckpt == "on" else "none", fn=counter.checkpoint_fn)
            with counter, fwd:
                loss = forward_loss(model, video, enc, dec, amp)
        else:
            with fwd:
                loss = forward_loss(model, video, enc, dec, amp)
        with bwd:
            loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def counted_flops(cell: Cell, amp: torch.dtype | None) -> dict:
    """FlopCounterMode over a fake forward and backward (checkpointing off: no recompute), per clip."""
    fwd, bwd = _fake_run(replace(cell, ckpt="off"), "math", amp)
    return {"fwd_flops_per_clip": fwd // cell.batch, "train_flops_per_clip": (fwd + bwd) // cell.batch}


def computed_saved_bytes(cell: Cell, amp: torch.dtype | None) -> int | None:
    """Exact saved-activation bytes of the cell's forward on fake CPU tensors (None for flash_attn: CUDA only)."""
    if cell.kernel == "flash_attn":
        return None
    counter = SavedTensorCounter()
    _fake_run(cell, cell.kernel, amp, counter=counter)
    return counter.activation_bytes
