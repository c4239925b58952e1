"""Config loading: YAML + dotted overrides, one-line errors naming the key and what is allowed."""

from __future__ import annotations

import pytest

from vmae_ds.config import ConfigError, MaskConfig, ModelConfig, Strict, apply_overrides, load_config
from vmae_ds.models import create_pretrain_model


class Run(Strict):
    """A two-section config like the training entry point's."""

    model: ModelConfig = ModelConfig()
    masks: MaskConfig = MaskConfig()
    seed: int = 0


def _err(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(Run, path, overrides)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  name: vit_tiny_debug\n  attention: math\nmasks:\n  decoder: none\nseed: 3\n")
    cfg = load_config(Run, f, ["model.num_frames=8", "masks.encoder_ratio=0.75", "seed=5", "model.drop_path_rate=.1"])
    assert cfg.model.name == "vit_tiny_debug" and cfg.model.attention == "math"
    assert cfg.model.num_frames == 8 and isinstance(cfg.model.num_frames, int)
    assert cfg.masks.decoder == "none" and cfg.masks.encoder_ratio == 0.75 and cfg.seed == 5
    assert cfg.masks.decoder_ratio == 0.5  # default kept
    assert cfg.model.overrides() == {"attention": "math", "num_frames": 8, "drop_path_rate": 0.1}
    model = create_pretrain_model(cfg.model.name, **cfg.model.overrides())
    assert model.grid == (4, 4, 4) and model.kernel.requested == "math"


def test_overrides_without_file_and_new_sections():
    cfg = load_config(Run, None, ["masks.decoder=frame"])
    assert cfg.masks.decoder == "frame" and cfg.model.name == "vit_base_patch16"
    assert apply_overrides({}, ["a.b.c=[1, 2]", "a.d=true"]) == {"a": {"b": {"c": [1, 2]}, "d": True}}


def test_unknown_key_names_dotted_key_and_allowed(tmp_path):
    msg = _err(overrides=["model.frames=8"])
    assert "'model.frames'" in msg and "num_frames" in msg and "attention" in msg
    assert "masks" not in msg  # allowed keys of the right section only
    msg = _err(overrides=["lr=3"])
    assert "'lr'" in msg and "model" in msg and "masks" in msg
    f = tmp_path / "bad.yaml"
    f.write_text("masks:\n  decoder_kind: random\n")
    msg = _err(f)
    assert msg.startswith(f"{f}: ") and "'masks.decoder_kind'" in msg and "decoder_ratio" in msg


def test_bad_literal_names_field_and_allowed_values():
    msg = _err(overrides=["model.attention=flash"])
    assert "'model.attention'" in msg and "'flash'" in msg
    for allowed in ("auto", "flash_attn", "sdpa", "math"):
        assert allowed in msg
    msg = _err(overrides=["masks.decoder=tube"])
    assert "'masks.decoder'" in msg and "running_cell" in msg and "frame" in msg
    msg = _err(overrides=["model.name=vit_nope"])
    assert "'model.name'" in msg and "vit_giant_patch14" in msg
    assert "'model.num_frames'" in _err(overrides=["model.num_frames=abc"])


@pytest.mark.parametrize("overrides,needle", [
    (["masks.encoder_ratio=1.0"], "encoder_ratio must be in (0, 1), got 1.0"),
    (["masks.encoder_ratio=0"], "encoder_ratio must be in (0, 1), got 0"),
    (["masks.decoder_ratio=0.6"], "decoder_ratio for running_cell must be one of (0.25, 0.5, 0.75), got 0.6"),
    (["masks.decoder=frame", "masks.decoder_ratio=0.75"], "decoder_ratio for frame masking must be 0.5"),
    (["masks.decoder=random", "masks.decoder_ratio=1.0"], "decoder_ratio for random masking must be in [0, 1)"),
])
def test_mask_ratio_validation(overrides, needle):
    msg = _err(overrides=overrides)
    assert needle in msg and "masks" in msg


def test_legal_mask_ratios():
    for r in (0.25, 0.5, 0.75):
        assert load_config(Run, None, [f"masks.decoder_ratio={r}"]).masks.decoder_ratio == r
    # random decoder masking takes any ratio; running-cell restrictions do not apply
    assert load_config(Run, None, ["masks.decoder=random", "masks.decoder_ratio=0.6"]).masks.decoder_ratio == 0.6


def test_file_and_override_syntax_errors(tmp_path):
    assert "not found" in _err(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in _err(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in _err(listy)
    assert "must look like key.sub=value" in _err(overrides=["model.name"])
    assert "'name' is not a section" in _err(overrides=["model.name=B", "model.name.x=1"])


def test_assignment_is_validated():
    cfg = MaskConfig()
    with pytest.raises(ValueError):
        cfg.decoder = "tube"


def test_yaml_errors_give_the_line_and_a_folder_is_one_line(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    assert _err(bad) == f"{bad}:3: not valid YAML (expected ',' or ']', but got ':')"
    assert _err(tmp_path) == f"{tmp_path}: cannot read the config file (Is a directory)"  # was a traceback
