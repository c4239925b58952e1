"""ZeRO's gradient checks in one multi-tensor pass instead of a few kernels per tensor.

DeepSpeed's stage-1/2 optimizer tests every gradient tensor for inf/NaN (max, min, isfinite, and, not: five
kernels each) and then takes every tensor's norm (a float64 copy, a norm, a copy): about ten launches and a
few dozen Python calls per tensor, issued after the overflow flag has been read back, i.e. while the GPU
waits. ViT-g has 582 gradient tensors: 5916 data-touching ops per step (`python -m benchmarks.optimizer_ops`),
the likeliest cause of the 0.25 s "optimizer" phase of a 0.86 s step on the H200 (UMT-B, a ViT-B-sized
student, still spent 0.08 s there). Not yet timed on a GPU.
`torch._foreach_norm` does the same float64 norms in one call; a norm in float64 is non-finite exactly when some
element is (the square of the largest bf16/fp32 value fits), so the same norms also answer the overflow question.

The results are DeepSpeed's to the bit on the CPU (same float64 norms, same sum, same all-reduces; see
tests/test_zero_checks.py). On CUDA the multi-tensor kernel accumulates the same float64 squares in another
order (not yet compared on a GPU). Installed on the optimizer instance,
so DeepSpeed's class stays untouched; layouts it does not cover (CPU offload, model parallel, MoE) keep
DeepSpeed's own code. ZeRO-3 already tests overflow on its flat gradient buffer; only its norm is replaced.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch

NORM_DTYPE = torch.float64  # DeepSpeed's get_norm_dtype() on every accelerator we run on


def install(optimizer: Any) -> bool:
    """Swap in the fused checks for a plain ZeRO-1/2/3 optimizer (on the device, no model parallelism, no MoE);
    False (untouched) otherwise."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not hasattr(torch, "_foreach_norm") or getattr(optimizer, "model_parallel_rank", 0) != 0:
        return False
    if type(optimizer) is DeepSpeedZeroOptimizer:
        if optimizer.cpu_offload or optimizer.has_moe_layers:
            return False
        optimizer.has_overflow_partitioned_grads_serial = MethodType(_any_nonfinite, optimizer)
        optimizer.get_grad_norm_direct = MethodType(_grad_norm, optimizer)
        return True
    if type(optimizer) is DeepSpeedZeroOptimizer_Stage3:
        # its overflow test already runs on the flat gradient buffer; the norm is per tensor
        if optimizer.offload_optimizer or optimizer.offload_param:
            return False
        optimizer.get_grad_norm_direct = MethodType(_grad_norm_stage3, optimizer)
        return True
    return False


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of ||g||^2 in float64 (one tensor on the gradients' device)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    parts = [torch.stack(torch._foreach_norm(gs, 2.0, dtype=NORM_DTYPE)).pow(2.0).sum() for gs in by_device.values()]
    return parts[0] if len(parts) == 1 else torch.stack([p.to(parts[0].device) for p in parts]).sum()


def _any_nonfinite(self: Any) -> torch.Tensor:
    """Replaces DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial: a bool tensor, no host sync."""
    grads = [g for i in range(len(self.bit16_groups)) for g in (self.averaged_gradients[i] or []) if g is not None]
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=self.device)
    return (~torch.isfinite(_sum_of_squares(grads))).reshape(1)


def _grad_norm(self: Any, gradients: list[torch.Tensor], params: list[torch.nn.Parameter],
               norm_type: float = 2) -> torch.Tensor:
    """Replaces DeepSpeedZeroOptimizer.get_grad_norm_direct for the L2 norm (other norms: DeepSpeed's)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(self, gradients, params, norm_type)
    # the same selection as DeepSpeed: padding gradients out, pipeline-replicated parameters counted once
    kept = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    grads = [g for g, p in zip(kept, params, strict=False)
             if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)]
    if grads:
        total = _sum_of_squares(grads).float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    # DeepSpeed's invalid-norm sentinel, filled from a Python scalar: its helper builds torch.tensor(-1.0) on
    # the device, a host-to-device copy that waits for the stream
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def _grad_norm_stage3(self: Any, gradients: list[torch.Tensor], params: list[torch.nn.Parameter],
                      norm_type: float = 2) -> torch.Tensor:
    """Replaces DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct for the L2 norm: the same partition group,
    the same selection of parameters and the same reductions, with the per-tensor norms in one call."""
    from deepspeed import comm as dist
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if float(norm_type) != 2.0 or not gradients:
        return DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct(self, gradients, params, norm_type)
    self._assert_same_partition_group(params)
    group = self._get_param_partition_group(params[0])
    every = self._grad_norm_counts_every_rank(params, group)
    grads = [g for g, p in zip(gradients, params, strict=False)
             if every or is_model_parallel_parameter(p) or self.model_parallel_rank == 0]
    if not grads:  # DeepSpeed's own zero for a rank that counts none of them
        return DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct(self, gradients, params, norm_type)
    total = _sum_of_squares(grads)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if not every:
        self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    expert_group = self._autoep_expert_parallel_group(params)
    if pg_utils.is_parallel(expert_group):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=expert_group)
    total = total**0.5
    return total.masked_fill(~torch.isfinite(total), -1.0)  # DeepSpeed's sentinel, without its host copy
