"""load_pretrained: every supported checkpoint layout, written to real files, loads to identical outputs.

Sources: the independent official re-implementation (`official_videomae_v2`, official key names), our own
models, and real tiny HuggingFace transformers VideoMAE models saved with `save_pretrained`.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from official_videomae_v2 import PretrainVisionTransformer
from safetensors.torch import save_file

from vmae_ds.masking import TokenGrid, tube_mask
from vmae_ds.models import CheckpointError, create_classifier, create_pretrain_model, get_spec, load_pretrained
from vmae_ds.models.pos_embed import sinusoid_table

transformers = pytest.importorskip("transformers")

NAME = "vit_tiny_debug"  # 4 frames of 32 px, patch 8, tubelet 2 -> grid (2, 4, 4), dim 48, decoder 32


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (biases, q/v biases, norms), so a wrong mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs(batch: int = 2, frames: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 3, frames, 32, 32, generator=g)
    return video, tube_mask(batch, TokenGrid(frames // 2, 4, 4), 0.75, generator=g)


def _official() -> PretrainVisionTransformer:
    s = get_spec(NAME)
    model = PretrainVisionTransformer(
        img_size=s.img_size, patch_size=s.patch_size, encoder_embed_dim=s.dim, encoder_depth=s.depth,
        encoder_num_heads=s.num_heads, decoder_num_classes=3 * s.tubelet_size * s.patch_size**2,
        decoder_embed_dim=s.decoder_dim, decoder_depth=s.decoder_depth, decoder_num_heads=s.decoder_heads,
        mlp_ratio=s.mlp_ratio, qkv_bias=True, tubelet_size=s.tubelet_size, all_frames=s.num_frames)
    return _randomize(model)


def _wrap(sd: dict, layout: str) -> dict:
    return {
        "model": {"model": sd, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4, model="vit_tiny")},
        "module": {"module": {f"module.{k}": v for k, v in sd.items()}},
        "orig_mod": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "state_dict": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }[layout]


# ---------------------------------------------------------------- official / our own layouts

@pytest.mark.parametrize("layout", ["model", "module", "orig_mod", "state_dict"])
def test_official_pretraining_checkpoint_gives_identical_outputs(tmp_path, layout):
    official = _official()
    path = tmp_path / "vit_tiny_pretrain.pth"
    torch.save(_wrap(official.state_dict(), layout), path)
    ours = create_pretrain_model(NAME).eval()
    report = load_pretrained(ours, path)
    assert report.source_format.startswith("videomae-pretrain")
    assert report.loaded == len(official.state_dict())
    assert not report.ignored and not report.missing and not report.skipped
    video, mask = _inputs()
    torch.testing.assert_close(ours(video, mask), official(video, mask), rtol=1e-5, atol=1e-5)


def test_our_safetensors_export_round_trips(tmp_path):
    src = _randomize(create_pretrain_model(NAME), seed=3)
    save_file(src.state_dict(), tmp_path / "export.safetensors")
    dst = create_pretrain_model(NAME).eval()
    load_pretrained(dst, tmp_path / "export.safetensors")
    video, mask = _inputs()
    assert torch.equal(dst(video, mask), src(video, mask))


def test_finetuned_checkpoint_into_classifier(tmp_path):
    src = _randomize(create_classifier(NAME, num_classes=7), seed=4)
    torch.save({"module": src.state_dict()}, tmp_path / "finetuned.pth")
    dst = create_classifier(NAME, num_classes=7).eval()
    report = load_pretrained(dst, tmp_path / "finetuned.pth")
    assert report.source_format.startswith("videomae-finetune")
    video, _ = _inputs()
    assert torch.equal(dst(video), src(video))


def test_pretraining_checkpoint_into_classifier_takes_the_encoder(tmp_path):
    official = _official()
    torch.save({"model": official.state_dict()}, tmp_path / "pretrain.pth")
    clf = create_classifier(NAME, num_classes=5)
    fresh_fc_norm = clf.fc_norm.weight.clone()
    report = load_pretrained(clf, tmp_path / "pretrain.pth")
    enc = official.encoder.state_dict()
    for k, v in clf.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.")):
            assert torch.equal(v, enc[k]), k
    assert torch.equal(clf.fc_norm.weight, fresh_fc_norm)  # fc_norm starts fresh, as in official fine-tuning
    assert {m.split()[0] for m in report.missing} == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    ignored = " ".join(report.ignored)
    assert "norm.weight" in ignored and "decoder.head.weight" in ignored and "mask_token" in ignored


def test_finetuned_encoder_into_pretraining_model_needs_strict_false(tmp_path):
    src = _randomize(create_classifier(NAME, num_classes=3), seed=5)
    save_file(src.state_dict(), tmp_path / "ft.safetensors")
    with pytest.raises(CheckpointError, match=r"missing .*decoder\.blocks\.\*\.attn\.qkv\.weight"):
        load_pretrained(create_pretrain_model(NAME), tmp_path / "ft.safetensors")
    model = create_pretrain_model(NAME)
    report = load_pretrained(model, tmp_path / "ft.safetensors", strict=False)
    for k, v in src.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.")):
            assert torch.equal(model.encoder.state_dict()[k], v), k
    assert "encoder.norm.weight" in report.missing and "mask_token" in report.missing
    assert any(i.startswith("head.weight") for i in report.ignored)


# ---------------------------------------------------------------- HuggingFace transformers

def _hf_config(**kw):
    s = get_spec(NAME)
    return transformers.VideoMAEConfig(
        image_size=s.img_size, patch_size=s.patch_size, num_frames=s.num_frames, tubelet_size=s.tubelet_size,
        hidden_size=s.dim, num_hidden_layers=s.depth, num_attention_heads=s.num_heads,
        intermediate_size=int(s.dim * s.mlp_ratio), decoder_hidden_size=s.decoder_dim,
        decoder_num_hidden_layers=s.decoder_depth, decoder_num_attention_heads=s.decoder_heads,
        decoder_intermediate_size=int(s.decoder_dim * s.mlp_ratio), qkv_bias=True,
        layer_norm_eps=1e-6, attn_implementation="eager", **kw)


def _official_eps(hf: torch.nn.Module) -> None:
    # HF builds decoder.norm / fc_norm with torch's default eps 1e-5; the official models (and ours) use 1e-6
    for m in hf.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_pretraining_checkpoint_matches_hf_forward(tmp_path, fmt):
    hf = _randomize(transformers.VideoMAEForPreTraining(_hf_config(use_mean_pooling=False)), seed=6)
    _official_eps(hf)
    assert torch.allclose(hf.videomae.embeddings.position_embeddings, sinusoid_table(32, 48), atol=1e-6)
    assert torch.allclose(hf.position_embeddings, sinusoid_table(32, 32), atol=1e-6)
    if fmt == "safetensors":  # save_pretrained writes the Hub names (attention.attention.q_bias / v_bias)
        hf.save_pretrained(tmp_path)
    else:  # a raw state dict uses the in-memory names (attention.attention.query.bias / value.bias)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = create_pretrain_model(NAME).eval()
    report = load_pretrained(ours, tmp_path)
    assert report.source_format == "hf-pretraining" and not report.missing
    video, mask = _inputs()
    expected = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=mask).logits
    torch.testing.assert_close(ours(video, mask), expected, rtol=1e-5, atol=1e-5)


def test_hf_classification_checkpoint_matches_hf_forward(tmp_path):
    hf = _randomize(transformers.VideoMAEForVideoClassification(_hf_config(num_labels=6)), seed=7)
    _official_eps(hf)
    hf.save_pretrained(tmp_path)
    ours = create_classifier(NAME, num_classes=6).eval()
    report = load_pretrained(ours, tmp_path / "model.safetensors")
    assert report.source_format == "hf-classification"
    video, _ = _inputs()
    torch.testing.assert_close(ours(video), hf(pixel_values=video.transpose(1, 2)).logits, rtol=1e-5, atol=1e-5)


def test_hf_base_model_into_our_encoder(tmp_path):
    hf = _randomize(transformers.VideoMAEModel(_hf_config(use_mean_pooling=False)), seed=8)
    hf.save_pretrained(tmp_path)
    encoder = create_pretrain_model(NAME).encoder.eval()
    assert load_pretrained(encoder, tmp_path).source_format == "hf-model"
    video, mask = _inputs()
    expected = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=mask).last_hidden_state
    torch.testing.assert_close(encoder(video, mask), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- position tables, patch embedding

def _ramp(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """A table linear in (t, h, w) with per-channel slopes: trilinear resampling must reproduce it exactly."""
    g = torch.Generator().manual_seed(9)
    slopes, offset = torch.randn(3, dim, generator=g), torch.randn(dim, generator=g)
    t, h, w = torch.meshgrid(*(torch.linspace(0, 1, n) for n in grid), indexing="ij")
    coords = torch.stack([t, h, w], -1).reshape(-1, 3)
    return (coords @ slopes + offset).unsqueeze(0)


@pytest.mark.parametrize("over,src_grid", [({"num_frames": 8}, (2, 4, 4)), ({}, (2, 2, 2))],
                         ids=["4_frames_into_8", "16px_into_32px"])
def test_learned_pos_embed_is_resampled_to_the_model_grid(tmp_path, over, src_grid):
    sd = _randomize(create_classifier(NAME, num_classes=2)).state_dict()
    sd["pos_embed"] = _ramp(src_grid, 48)
    save_file(sd, tmp_path / "learned_pos.safetensors")
    model = create_classifier(NAME, num_classes=2, **over)
    report = load_pretrained(model, tmp_path / "learned_pos.safetensors")
    assert model.pos_embed.shape == (1, model.num_tokens, 48)
    torch.testing.assert_close(model.pos_embed, _ramp(model.grid, 48), rtol=0, atol=1e-5)
    assert any("resampled" in a for a in report.adapted)


def test_position_table_of_unknown_grid_needs_source_grid(tmp_path):
    sd = _randomize(create_classifier(NAME, num_classes=2)).state_dict()
    sd["pos_embed"] = _ramp((2, 3, 4), 48)  # 24 rows: neither 4x4 frames nor a square grid
    save_file(sd, tmp_path / "odd.safetensors")
    model = create_classifier(NAME, num_classes=2)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: .*24-row position table.*source_grid"):
        load_pretrained(model, tmp_path / "odd.safetensors")
    load_pretrained(model, tmp_path / "odd.safetensors", source_grid=(2, 3, 4))
    torch.testing.assert_close(model.pos_embed, _ramp(model.grid, 48), rtol=0, atol=1e-5)


def test_saved_sinusoid_table_is_dropped(tmp_path):
    sd = dict(_official().state_dict(), **{"encoder.pos_embed": sinusoid_table(32, 48)})
    torch.save({"model": sd}, tmp_path / "with_table.pth")
    model = create_pretrain_model(NAME)
    report = load_pretrained(model, tmp_path / "with_table.pth")
    assert any(i.startswith("encoder.pos_embed (fixed sinusoid") for i in report.ignored)
    assert torch.equal(model.encoder.pos_embed, sinusoid_table(32, 48))


def test_tubelet_mismatch_errors_unless_inflated(tmp_path):
    sd = _randomize(create_pretrain_model(NAME, tubelet_size=1)).state_dict()
    del sd["decoder.head.weight"], sd["decoder.head.bias"]  # its pixel head is per tubelet too
    save_file(sd, tmp_path / "tubelet1.safetensors")
    with pytest.raises(CheckpointError, match="tubelet size 1 .* inflate_patch_embed=True"):
        load_pretrained(create_pretrain_model(NAME), tmp_path / "tubelet1.safetensors", strict=False)
    image = dict(sd, **{"encoder.patch_embed.proj.weight": sd["encoder.patch_embed.proj.weight"][:, :, 0]})
    save_file(image, tmp_path / "image.safetensors")
    with pytest.raises(CheckpointError, match=r"2-D \(image\) patch embedding"):
        load_pretrained(create_pretrain_model(NAME), tmp_path / "image.safetensors", strict=False)
    model = create_pretrain_model(NAME)
    report = load_pretrained(model, tmp_path / "tubelet1.safetensors", strict=False, inflate_patch_embed=True)
    assert any("inflated" in a for a in report.adapted)
    frame = torch.randn(1, 3, 1, 32, 32)
    static = frame.expand(1, 3, 4, 32, 32)  # a still clip embeds as the 1-frame source does, frame by frame
    src = torch.nn.functional.conv3d(frame, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"],
                                     stride=(1, 8, 8)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.encoder.patch_embed(static), src.repeat(1, 2, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals and errors

def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"model": {"w": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: .*weights_only") as err:
        load_pretrained(create_pretrain_model(NAME), tmp_path / "evil.pth")
    assert str(err.value).endswith("(Unsupported global: GLOBAL getattr was not an allowed global "
                                   "by default)")  # the reason, without torch's advice to allowlist it
    assert not marker.exists()


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.pth"])
def test_corrupted_files_are_refused(tmp_path, name):
    sd = create_pretrain_model(NAME).state_dict()
    path = tmp_path / name
    save_file(sd, path) if name.endswith(".safetensors") else torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: unreadable or corrupted"):
        load_pretrained(create_pretrain_model(NAME), path)


@pytest.mark.parametrize("content,message", [
    (bytes(range(256)) * 8, r"not a checkpoint: neither safetensors nor a torch\.save file \(Unsupported operand"),
    (b"hello world, not weights\n" * 20, r"not a checkpoint: neither safetensors nor a torch\.save file"),
    (b'{"model": 1}', r"not a checkpoint: neither safetensors nor a torch\.save file"),
    (bytes(1000), r"unreadable or corrupted checkpoint: Cannot use ``weights_only=True`` .*legacy \.tar format\.$"),
    (b"", r"empty file, not a checkpoint")])
def test_files_that_are_no_checkpoint_give_one_clear_line(tmp_path, content, message):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"junk\.pth: " + message) as err:
        load_pretrained(create_pretrain_model(NAME), path)
    msg = str(err.value)
    assert "\n" not in msg and "file an issue" not in msg.lower() and "weights_only` set to `False" not in msg


def test_a_training_run_folder_points_to_vmae_export(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000010").mkdir(parents=True)
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000010"):
        with pytest.raises(CheckpointError, match=rf"^{folder}: a DeepSpeed training run/checkpoint; export it "
                                                  rf"first: vmae-export {folder} weights\.safetensors$"):
            load_pretrained(create_pretrain_model(NAME), folder)


def test_mismatch_error_lists_missing_unexpected_and_shapes(tmp_path):
    sd = _official().state_dict()
    sd["encoder.extra.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "other.pth")
    model = create_pretrain_model(NAME, depth=3, decoder_dim=40, decoder_heads=2)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, tmp_path / "other.pth")
    msg = str(err.value)
    assert "other.pth" in msg
    assert "missing (13): encoder.blocks.*.norm1.weight" in msg  # the third block, grouped over its index
    assert "unexpected (1): encoder.extra.weight" in msg
    assert "shape mismatch" in msg and "mask_token: checkpoint (1, 1, 32) vs model (1, 1, 40)" in msg
    report = load_pretrained(model, tmp_path / "other.pth", strict=False)
    assert "encoder.extra.weight (unexpected)" in report.skipped and "mask_token (shape)" in report.skipped
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, sd["encoder.blocks.1.attn.qkv.weight"])
