"""Model zoo: `create_pretrain_model`, `create_classifier`, `load_pretrained`, the CLIP teacher, HF export."""

from .checkpoint_import import CheckpointError, LoadReport, load_pretrained
from .clip_teacher import CLIP_MEAN, CLIP_SPECS, CLIP_STD, CLIPTeacher, TeacherLoadError, load_clip_teacher
from .hf_format import HFExportError, hf_config_dict, save_hf
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
           "count_params", "create_classifier", "create_pretrain_model", "get_spec", "list_models",
           "CheckpointError", "LoadReport", "load_pretrained",
           "CLIP_MEAN", "CLIP_SPECS", "CLIP_STD", "CLIPTeacher", "TeacherLoadError", "load_clip_teacher",
           "HFExportError", "hf_config_dict", "save_hf"]
