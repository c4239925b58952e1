"""Configs validated at the edge: pydantic models with extra="forbid", YAML files, dotted overrides.

Inside the library, code takes plain values; only entry points touch these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .masking import RUNNING_CELL_RATIOS
from .models.registry import ALIASES, MODELS, ModelSpec, get_spec

AttentionKernel = Literal["auto", "flash_attn", "sdpa", "math"]
ModelName = Literal[tuple(list(MODELS) + list(ALIASES))]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """One-line configuration error naming the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: ModelName = "vit_base_patch16"
    attention: AttentionKernel = "auto"
    depth: int | None = Field(None, gt=0, description="encoder blocks (tests: real widths at tiny depth)")
    num_frames: int | None = Field(None, gt=0)
    img_size: int | None = Field(None, gt=0)
    tubelet_size: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)
    decoder_depth: int | None = Field(None, gt=0)
    decoder_dim: int | None = Field(None, gt=0)
    decoder_heads: int | None = Field(None, gt=0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        """Sizes that cannot make a model fail here, not when the model is built on every rank."""
        spec = self.spec()  # an impossible size raises a one-line ValueError here
        if spec.decoder_dim % spec.decoder_heads:
            raise ValueError(f"decoder_dim {spec.decoder_dim} is not divisible by decoder_heads {spec.decoder_heads}")
        return self

    def spec(self) -> ModelSpec:
        """The model's sizes (registry entry + size overrides), without building it."""
        sizes = {k: v for k, v in self.overrides().items() if k not in ("attention", "drop_path_rate")}
        return get_spec(self.name, **sizes)

    def overrides(self) -> dict[str, Any]:
        """Keyword overrides for `create_pretrain_model(self.name, **...)`."""
        d = self.model_dump(exclude={"name"})
        return {k: v for k, v in d.items() if v is not None}


class MaskConfig(Strict):
    encoder: Literal["tube", "random"] = "tube"
    encoder_ratio: float = 0.9
    decoder: Literal["running_cell", "random", "frame", "none"] = "running_cell"
    decoder_ratio: float = 0.5

    @model_validator(mode="after")
    def _legal_ratios(self) -> MaskConfig:
        if not 0.0 < self.encoder_ratio < 1.0:
            raise ValueError(f"encoder_ratio must be in (0, 1), got {self.encoder_ratio}")
        if self.decoder == "running_cell" and self.decoder_ratio not in RUNNING_CELL_RATIOS:
            raise ValueError(f"decoder_ratio for running_cell must be one of {RUNNING_CELL_RATIOS}, "
                             f"got {self.decoder_ratio}")
        if self.decoder == "random" and not 0.0 <= self.decoder_ratio < 1.0:
            raise ValueError(f"decoder_ratio for random masking must be in [0, 1), got {self.decoder_ratio}")
        if self.decoder == "frame" and self.decoder_ratio != 0.5:
            raise ValueError(f"decoder_ratio for frame masking must be 0.5, got {self.decoder_ratio}")
        return self


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """Field names allowed at `loc` (for 'unknown key' errors)."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part)) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return ""
        ann = field.annotation
        cls = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return ""
    return ", ".join(cls.model_fields)


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first problem, on one line, with the dotted field name and what is allowed.

    `prefix`: where `model` sits in a bigger config (e.g. "data.shards."), so the key reads in full."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "<root>"
    if e["type"] == "extra_forbidden":
        allowed = _allowed(model, loc)
        return f"unknown config key '{key}'" + (f" (allowed here: {allowed})" if allowed else "")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' messages
    given = e.get("input")
    got = "" if isinstance(given, (dict, BaseModel)) else f" (got {given!r})"  # a whole section says nothing
    return f"config field '{key}': {msg}{got}{more}"


T = TypeVar("T", bound=BaseModel)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML (optional), apply dotted overrides, validate; raise ConfigError with one line."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:  # a folder, no permission, ...
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({what})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_blame(e, path, overrides or []) + format_validation_error(e, model)) from None


def _blame(err: ValidationError, path: str | Path | None, overrides: list[str]) -> str:
    """Where the bad value came from: the command-line override that set (part of) the field, else the file."""
    key = ".".join(str(p) for p in err.errors()[0]["loc"])
    for item in reversed(overrides):  # the last override of a key wins, so blame it
        okey = item.split("=", 1)[0].strip()
        if key and (okey == key or okey.startswith(key + ".") or key.startswith(okey + ".")):
            return f"override {item!r}: "
    return f"{path}: " if path else ""
