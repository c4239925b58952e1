"""Exact bytes of the tensors autograd keeps for backward, via saved-tensor hooks.

Counting rules (documented in benchmarks/README.md):
- bytes are counted per *storage*, once: views (q/k/v slices of one qkv buffer, reshapes, transposes)
  share a storage and add nothing. A storage's full size counts, since that is what stays allocated.
- storages owned by the module's parameters and buffers are reported separately (`param_bytes`), not as
  activations: they are alive whether or not a step runs.
- autocast's low-precision copies of those parameters are held until backward too, but their size does
  not grow with the batch; they are reported separately as `weight_cast_bytes` (a dispatch mode sees each
  `_to_copy` of a parameter). `activation_bytes` is everything else: it scales with the micro-batch.
- activation checkpointing hides a block's internals from these hooks (the checkpoint keeps only its
  inputs, by reference); `checkpoint_fn` records those inputs so a checkpointed model is counted too.
Works on real, meta and fake tensors (sizes only), which is what makes the number device-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

_TO_COPY = torch.ops.aten._to_copy.default


def _sid(t: torch.Tensor) -> int:
    # The StorageImpl address identifies a storage for real, meta and fake tensors alike (data_ptr is 0
    # on meta). Held storages stay alive inside the context, so an address cannot be reused meanwhile.
    return t.untyped_storage()._cdata


class _WeightCasts(TorchDispatchMode):
    """Remembers the storages of dtype casts of parameters (what autocast makes of each weight)."""

    def __init__(self, param_ids: set[int]):
        super().__init__()
        self.param_ids = param_ids
        self.cast_ids: dict[int, torch.Tensor] = {}  # kept alive so ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _TO_COPY and isinstance(args[0], torch.Tensor) and _sid(args[0]) in self.param_ids:
            self.cast_ids[_sid(out)] = out
        return out


class SavedTensorCounter:
    """Context manager: `with SavedTensorCounter(model.parameters()) as c: loss = f(x)`; then c.activation_bytes."""

    def __init__(self, params: Iterable[torch.Tensor] = ()):
        self._param_ids = {_sid(p) for p in params}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self.activation_bytes = 0
        self.param_bytes = 0
        self.weight_cast_bytes = 0
        self._casts = _WeightCasts(self._param_ids)
        self.num_saved = 0  # pack-hook calls (tensors, before de-duplication)
        self.scope: str | None = None  # set by `attribute_to_blocks`: which block is running
        self.bytes_by_scope: dict[str, int] = {}
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)

    def exclude(self, params: Iterable[torch.Tensor]) -> None:
        """Mark more storages as parameters (e.g. once a model has been materialised)."""
        self._param_ids.update(_sid(p) for p in params)

    def add(self, t: torch.Tensor) -> None:
        """Count one tensor kept for backward (the hook calls this; so does `checkpoint_fn`)."""
        self.num_saved += 1
        sid = _sid(t)
        if sid in self._storages:
            return
        storage = t.untyped_storage()
        self._storages[sid] = storage
        if sid in self._param_ids:
            self.param_bytes += storage.nbytes()
        elif sid in self._casts.cast_ids:
            self.weight_cast_bytes += storage.nbytes()
        else:
            self.activation_bytes += storage.nbytes()
            if self.scope is not None:
                self.bytes_by_scope[self.scope] = self.bytes_by_scope.get(self.scope, 0) + storage.nbytes()

    @property
    def max_block_bytes(self) -> int:
        """Largest activation bytes first saved inside one block: what checkpointing recomputes at once."""
        return max(self.bytes_by_scope.values(), default=0)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def checkpoint_fn(self, fn: Callable, *args: torch.Tensor) -> torch.Tensor:
        """Drop-in for the model's checkpoint function: counts the inputs the checkpoint holds on to."""
        for a in args:
            if isinstance(a, torch.Tensor):
                self.add(a)
        return checkpoint(fn, *args, use_reentrant=False)

    def __enter__(self) -> SavedTensorCounter:
        self._casts.__enter__()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._casts.__exit__(*exc)
        self._storages.clear()  # keep the numbers, not the memory
        self._casts.cast_ids.clear()


@contextmanager
def attribute_to_blocks(counter: SavedTensorCounter, blocks: dict[str, torch.nn.Module]) -> Iterator[None]:
    """While a block's forward runs, attribute newly saved storages to it (`counter.bytes_by_scope`)."""

    def enter(name: str) -> Callable:
        return lambda *_: setattr(counter, "scope", name)

    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(enter(name)))
        handles.append(block.register_forward_hook(lambda *_: setattr(counter, "scope", None)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
