"""WebDataset video loading for VideoMAE V2: pretraining stream, fine-tuning and test-time views."""

from vmae_ds.data.config import DataConfig
from vmae_ds.data.finetune import EvalLoader, build_finetune_loader
from vmae_ds.data.loader import (
    LoaderStateError,
    PretrainLoader,
    SharedMemoryError,
    build_pretrain_loader,
    default_mask_fn,
    token_grid,
)
from vmae_ds.data.stream import MultiScaleCrops
from vmae_ds.data.transforms import normalize_on_device

__all__ = [
    "DataConfig", "EvalLoader", "LoaderStateError", "MultiScaleCrops", "PretrainLoader", "SharedMemoryError",
    "build_finetune_loader", "build_pretrain_loader", "default_mask_fn", "normalize_on_device", "token_grid",
]
