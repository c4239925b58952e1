"""One real training step per benchmark cell: forward, loss, backward, AdamW step; timed and measured."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.checkpoint import checkpoint

from vmae_ds.losses import pixel_target, reconstruction_loss
from vmae_ds.masking import TokenGrid, make_masks
from vmae_ds.memory.saved_tensors import SavedTensorCounter, attribute_to_blocks
from vmae_ds.models import PretrainVideoMAE, create_pretrain_model

MASKINGS = ("encoder_only", "dual")
CKPT = ("off", "on")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: size x masking x kernel x checkpointing at a micro-batch."""

    model: str  # alias: debug S B L H g
    masking: str  # encoder_only (decoder sees all encoder-hidden tokens) | dual (running cell 50%)
    kernel: str  # math | sdpa | flash_attn
    ckpt: str  # off | on (every encoder and decoder block, as the official code does)
    batch: int
    num_frames: int | None = None  # None: the model's own 16 frames

    @property
    def decoder_mask(self) -> str:
        return "none" if self.masking == "encoder_only" else "running_cell"

    @property
    def label(self) -> str:
        return f"{self.model}/{self.masking}/{self.kernel}/ckpt-{self.ckpt}/b{self.batch}"

    def overrides(self) -> dict:
        return {} if self.num_frames is None else {"num_frames": self.num_frames}

    def to_dict(self) -> dict:
        return asdict(self)


def plain_checkpoint(fn, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(fn, *args, use_reentrant=False)


def build_model(cell: Cell, device: torch.device | str) -> PretrainVideoMAE:
    with torch.device(device):  # initialised in place: on host cores ViT-g's init costs seconds per cell
        model = create_pretrain_model(cell.model, attention=cell.kernel, **cell.overrides())
    model = model.to(device)
    model.set_activation_checkpointing("full" if cell.ckpt == "on" else "none", fn=plain_checkpoint)
    return model.train()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # The official recipe's AdamW; fused on CUDA so the optimizer is not the bottleneck of the step.
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=on_cuda)


def make_batch(model: PretrainVideoMAE, cell: Cell, batch: int, device: torch.device | str,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random normalised video and (encoder, decoder) masks; masks are drawn on the CPU then moved."""
    t, h, w = model.grid
    p, tub = model.patch_size, model.tubelet_size
    gen = torch.Generator().manual_seed(seed)
    enc, dec = make_masks("tube", 0.9, cell.decoder_mask, 0.5, batch, TokenGrid(t, h, w), generator=gen)
    video = torch.randn(batch, 3, t * tub, h * p, w * p, generator=gen)
    return video.to(device), enc.to(device), None if dec is None else dec.to(device)


def forward_loss(model: PretrainVideoMAE, video: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor | None,
                 amp: torch.dtype | None) -> torch.Tensor:
    """Autocast forward + loss (the loss itself runs in fp32, as `reconstruction_loss` casts)."""
    with torch.autocast(video.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        pred = model(video, enc, dec)
    target = pixel_target(video, model.patch_size, model.tubelet_size)
    return reconstruction_loss(pred, target, enc, dec)


def train_step(model: PretrainVideoMAE, opt: torch.optim.Optimizer, batch: tuple, amp: torch.dtype | None) -> float:
    opt.zero_grad(set_to_none=True)
    loss = forward_loss(model, *batch, amp)
    loss.backward()
    opt.step()
    return loss.detach()


def model_blocks(model: PretrainVideoMAE) -> dict[str, torch.nn.Module]:
    blocks = {f"encoder.{i}": b for i, b in enumerate(model.encoder.blocks)}
    return blocks | {f"decoder.{i}": b for i, b in enumerate(model.decoder.blocks)}


def count_saved(model: PretrainVideoMAE, batch: tuple, amp: torch.dtype | None,
                opt: torch.optim.Optimizer | None = None) -> SavedTensorCounter:
    """Saved-for-backward bytes of one forward + loss (checkpoint inputs included), then backward and,
    with `opt`, the optimizer step: a complete training step that serves as the first warm-up step."""
    ckpt_on = model.encoder.num_ckpt_blocks > 0
    buffers = [*model.parameters(), *model.buffers()]
    with SavedTensorCounter(buffers) as counter, attribute_to_blocks(counter, model_blocks(model)):
        if ckpt_on:
            model.set_activation_checkpointing("full", fn=counter.checkpoint_fn)
        loss = forward_loss(model, *batch, amp)
    if ckpt_on:
        model.set_activation_checkpointing("full", fn=plain_checkpoint)
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    return counter


def _mark(cuda: bool) -> torch.cuda.Event | float:
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(a: torch.cuda.Event | float, b: torch.cuda.Event | float) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def timed_steps(model: PretrainVideoMAE, opt: torch.optim.Optimizer, batch: tuple, amp: torch.dtype | None,
                warmup: int, steps: int, optimizer_times: list[float] | None = None) -> list[float]:
    """Seconds per whole step after `warmup` untimed steps: CUDA events on GPU, perf_counter on CPU.

    `optimizer_times` (if given) receives the AdamW part of each step: it is the same in both masking
    modes, so it dilutes their time ratio at small micro-batches and the report subtracts it to explain."""
    cuda = batch[0].is_cuda
    for _ in range(warmup):
        train_step(model, opt, batch, amp)
    times = []
    for _ in range(steps):
        t0 = _mark(cuda)
        opt.zero_grad(set_to_none=True)
        forward_loss(model, *batch, amp).backward()
        t1 = _mark(cuda)
        opt.step()
        t2 = _mark(cuda)  # CPU ops are synchronous; CUDA events are synchronised in _seconds
        times.append(_seconds(t0, t2))
        if optimizer_times is not None:
            optimizer_times.append(_seconds(t1, t2))
    return times


def _prepare(cell: Cell, device: torch.device, amp: torch.dtype | None) -> tuple:
    torch.manual_seed(0)
    model = build_model(cell, device)
    opt = make_optimizer(model)
    batch = make_batch(model, cell, cell.batch, device)
    saved = count_saved(model, batch, amp, opt)  # = warm-up step 1
    return model, opt, batch, saved


def _result(cell: Cell, model: PretrainVideoMAE, saved: SavedTensorCounter, times: list[float],
            opt_times: list[float]) -> dict:
    med = statistics.median(times)
    return {"step_times_s": times, "step_time_s": med, "optimizer_time_s": statistics.median(opt_times),
            "time_per_clip_s": med / cell.batch,
            "clips_per_s": cell.batch / med, "saved_activation_bytes": saved.activation_bytes,
            "saved_param_bytes": saved.param_bytes,
            "weight_cast_bytes": saved.weight_cast_bytes, "max_block_bytes": saved.max_block_bytes,
            "kernel_used": model.kernel.used}


def measure_cuda(cell: Cell, device: torch.device, amp: torch.dtype | None, warmup: int, steps: int) -> dict:
    """One cell alone on the GPU, so its peak allocated bytes are its own."""
    torch.cuda.empty_cache()
    model, opt, batch, saved = _prepare(cell, device, amp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    opt_times: list[float] = []
    times = timed_steps(model, opt, batch, amp, max(0, warmup - 1), steps, opt_times)
    out = _result(cell, model, saved, times, opt_times)
    out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def measure_interleaved(cells: list[Cell], device: torch.device, amp: torch.dtype | None, warmup: int,
                        steps: int) -> list[dict]:
    """Cells side by side, one timed step each in turn: on a shared CPU, load changes then hit every
    cell alike instead of whichever cell happened to run at a bad moment (no mode gets a quieter slot)."""
    prepared = [_prepare(c, device, amp) for c in cells]
    for model, opt, batch, _ in prepared:
        timed_steps(model, opt, batch, amp, max(0, warmup - 1), 0)
    times: list[list[float]] = [[] for _ in cells]
    opt_times: list[list[float]] = [[] for _ in cells]
    for _ in range(steps):
        for i, (model, opt, batch, _) in enumerate(prepared):
            times[i] += timed_steps(model, opt, batch, amp, 0, 1, opt_times[i])
    return [_result(c, p[0], p[3], t, o) for c, p, t, o in zip(cells, prepared, times, opt_times)]
