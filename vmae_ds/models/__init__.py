"""Model zoo: `create_pretrain_model`, `create_classifier`, `load_pretrained`."""

from .checkpoint_import import CheckpointError, LoadReport, load_pretrained
from .registry import (
           ALIASES,
           MODELS,
           ModelSpec,
           count_params,
           create_classifier,
           create_pretrain_model,
           get_spec,
           list_models,
)
from .vit import PretrainVideoMAE, VideoClassifier, VideoEncoder

__all__ = ["ALIASES", "MODELS", "ModelSpec", "PretrainVideoMAE", "VideoClassifier", "VideoEncoder",
           "count_params", "create_classifier", "create_pretrain_model", "get_spec", "list_models"]
__all__ += ["CheckpointError", "LoadReport", "load_pretrained"]
