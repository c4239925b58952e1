"""Exact bytes of the tensors autograd keeps for backward, via saved-tensor hooks.

Counting rules (documented in benchmarks/README.md):
- bytes are counted per *storage*, once: views (q/k/v slices of one qkv buffer, reshapes, transposes)
  share a storage and add nothing. A storage's full size counts, since that is what stays allocated.
- storages owned by the module's parameters and buffers are reported separately (`param_bytes`), not as
  activations: they are alive whether or not a step runs. Casts of weights made by autocast are new
  storages held until backward, so they count as activations.
- activation checkpointing hides a block's internals from these hooks (the checkpoint keeps only its
  inputs, by reference); `checkpoint_fn` records those inputs so a checkpointed model is counted too.
Works on real, meta and fake tensors (sizes only), which is what makes the number device-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint


class SavedTensorCounter:
    """Context manager: `with SavedTensorCounter(model.parameters()) as c: loss = f(x)`; then c.activation_bytes."""

    def __init__(self, params: Iterable[torch.Tensor] = ()):
        self._param_ids = {self._sid(p) for p in params}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self.activation_bytes = 0
        self.param_bytes = 0
        self.num_saved = 0  # pack-hook calls (tensors, before de-duplication)
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _sid(t: torch.Tensor) -> int:
        # The StorageImpl address identifies a storage for real, meta and fake tensors alike (data_ptr is 0
        # on meta). Held storages stay alive inside the context, so an address cannot be reused meanwhile.
        return t.untyped_storage()._cdata

    def exclude(self, params: Iterable[torch.Tensor]) -> None:
        """Mark more storages as parameters (e.g. once a model has been materialised)."""
        self._param_ids.update(self._sid(p) for p in params)

    def add(self, t: torch.Tensor) -> None:
        """Count one tensor kept for backward (the hook calls this; so does `checkpoint_fn`)."""
        self.num_saved += 1
        sid = self._sid(t)
        if sid in self._storages:
            return
        storage = t.untyped_storage()
        self._storages[sid] = storage
        if sid in self._param_ids:
            self.param_bytes += storage.nbytes()
        else:
            self.activation_bytes += storage.nbytes()

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
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._storages.clear()  # keep the numbers, not the memory
