"""Numbers computed without real data: analytic FLOPs, and counted FLOPs + saved bytes on fake tensors.

Fake-tensor runs are exact for the real size (16 frames, 224 px) on any machine, and are what the report
marks "computed". Counted FLOPs come from the `math` kernel: FlopCounterMode has no formula for the CPU
SDPA kernel (it would miss the two attention matmuls), and model FLOPs do not depend on the kernel.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from vmae_ds.flops import pretrain_flops
from vmae_ds.masking import select_tokens
from vmae_ds.memory.fake import fake_cpu
from vmae_ds.memory.saved_tensors import SavedTensorCounter, attribute_to_blocks
from vmae_ds.models import count_params, create_pretrain_model, get_spec

from .step import Cell, forward_loss, make_batch, model_blocks


def analytic_flops(cell: Cell) -> dict:
    """Per clip, from vmae_ds.flops (multiply-add = 2 FLOPs); train = 3x forward, recompute not counted."""
    spec = get_spec(cell.model, **cell.overrides())
    fwd = pretrain_flops(spec, decoder_mode=cell.decoder_mask, encoder_ratio=0.9, decoder_ratio=0.5)
    return {"fwd_flops_per_clip": fwd.total, "train_flops_per_clip": 3 * fwd.total,
            "fwd_decoder_share": (fwd.decoder + fwd.head) / fwd.total}


def num_params(cell: Cell) -> int:
    with torch.device("meta"):
        return count_params(create_pretrain_model(cell.model, **cell.overrides()))


def fake_step(cell: Cell, amp: torch.dtype | None, count_flops: bool = False) -> dict:
    """Real-size forward + loss on fake CPU tensors: exact saved-activation bytes (checkpointing as the cell
    says); with count_flops, also a backward under FlopCounterMode (checkpointing must be off then)."""
    if cell.kernel == "flash_attn":
        raise ValueError("flash_attn runs on CUDA only; it has no fake-CPU equivalent")
    with torch.device("meta"):
        model = create_pretrain_model(cell.model, attention=cell.kernel, **cell.overrides())
    video, enc, dec = make_batch(model, cell, cell.batch, "cpu")
    # the masks' index form is made from the real masks, outside fake mode: its shapes are then known
    sel = select_tokens(enc, dec)
    with fake_cpu() as mode:
        model = model.to_empty(device="cpu").train()
        video = mode.from_tensor(video)
        counter = SavedTensorCounter([*model.parameters(), *model.buffers()])
        model.set_activation_checkpointing("full" if cell.ckpt == "on" else "none", fn=counter.checkpoint_fn)
        fwd_fc = FlopCounterMode(display=False) if count_flops else nullcontext()
        with counter, fwd_fc, attribute_to_blocks(counter, model_blocks(model)):
            loss = forward_loss(model, video, sel, None, amp)
        out = {"saved_activation_bytes": counter.activation_bytes, "saved_param_bytes": counter.param_bytes,
               "weight_cast_bytes": counter.weight_cast_bytes, "max_block_bytes": counter.max_block_bytes}
        if count_flops:
            if cell.ckpt == "on":
                raise ValueError("count FLOPs without checkpointing: recompute is not model FLOPs")
            with FlopCounterMode(display=False) as bwd_fc:
                loss.backward()
            fwd, bwd = fwd_fc.get_total_flops(), bwd_fc.get_total_flops()
            out.update(fwd_flops_per_clip=fwd // cell.batch, train_flops_per_clip=(fwd + bwd) // cell.batch)
    return out


def counted_flops(cell: Cell, amp: torch.dtype | None) -> dict:
    """Counted forward and forward+backward FLOPs per clip (math kernel, no checkpointing, no recompute)."""
    out = fake_step(replace(cell, kernel="math", ckpt="off"), amp, count_flops=True)
    return {k: out[k] for k in ("fwd_flops_per_clip", "train_flops_per_clip")}
