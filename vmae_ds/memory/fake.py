"""Run a real-size training step on *fake* CPU tensors: shapes, dtypes and autograd, no data, no FLOPs.

Used for sizes the machine cannot run (ViT-g on a 2-core CPU). FakeTensorMode keeps the CPU dispatch
path, so autocast and the CPU SDPA kernel behave as in a real run (the meta device does neither: it
ignores autocast and lowers SDPA to the math path, which would be wrong for the `sdpa` cell).

The one data-dependent op in the model is the boolean gather `x[~mask]`; `MaskShadow` keeps the real
value of every tensor computed from the (real) masks and turns a boolean index into the equivalent
integer index, so output shapes stay exact. It also corrects the one fake kernel whose saved outputs have
the wrong dtype (layer-norm statistics), so fake counts equal real counts byte for byte (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

_INDEX = torch.ops.aten.index.Tensor
_LAYER_NORM = torch.ops.aten.native_layer_norm.default
_ITEM = torch.ops.aten._local_scalar_dense.default


class MaskShadow(TorchDispatchMode):
    """Shadow-evaluates ops whose tensor inputs are all real (masks) so boolean indexing has a shape."""

    def __init__(self) -> None:
        super().__init__()
        self._real: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(fake) -> (fake, real value)

    def _value(self, x: object) -> object:
        if isinstance(x, FakeTensor):
            hit = self._real.get(id(x))
            return None if hit is None else hit[1]
        return x

    def _known(self, t: torch.Tensor) -> bool:
        return not isinstance(t, FakeTensor) or id(t) in self._real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _INDEX:
            return self._index(args[0], args[1])
        if func is _ITEM and isinstance(self._value(args[0]), torch.Tensor):
            # a host read of a value computed from real inputs (labels checked by an objective): answer it
            with _disable_current_modes():
                return self._value(args[0]).item()
        if func is _LAYER_NORM and args[0].dtype in (torch.bfloat16, torch.float16):
            # The real CPU and CUDA kernels keep mean/rstd (saved for backward) in fp32; the fake kernel
            # would report the input dtype and undercount them.
            y, mean, rstd = func(*args, **kwargs)
            return y, mean.float(), rstd.float()
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if tensors and all(self._known(t) for t in tensors) and isinstance(out, FakeTensor):
            rargs, rkwargs = tree_map(self._value, (args, kwargs))
            with _disable_current_modes():
                self._real[id(out)] = (out, func(*rargs, **rkwargs))
        return out

    def _index(self, x: torch.Tensor, indices: list) -> torch.Tensor:
        new: list = []
        for i in indices:
            value = self._value(i) if i is not None else None
            if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                with _disable_current_modes():
                    new.extend(value.nonzero().unbind(1))
            else:
                new.append(i)
        return _INDEX(x, new)


@contextmanager
def fake_cpu() -> Iterator[FakeTensorMode]:
    """Fake-tensor mode (CPU device semantics) with mask shadowing; build modules on meta, then
    `module.to_empty(device="cpu")` inside this context."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, MaskShadow():
        yield mode
