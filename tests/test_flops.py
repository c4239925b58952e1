"""The analytic FLOPs count must equal torch's FlopCounterMode on the real forward pass."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vmae_ds import flops
from vmae_ds.flops import (
    FlopsBreakdown,
    classifier_flops,
    embed_flops,
    pretrain_flops,
    train_step_flops,
)
from vmae_ds.flops_cli import main
from vmae_ds.masking import RUNNING_CELL_RATIOS, TokenGrid, make_masks
from vmae_ds.models import create_classifier, create_pretrain_model, get_spec

# (name, overrides): the tiny debug model and a small-but-real ViT-S (full width/depth, few tokens)
CASES = [("vit_tiny_debug", {}), ("vit_small_patch16", {"num_frames": 4, "img_size": 96})]


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,over", CASES)
@pytest.mark.parametrize("decoder_mode", ["running_cell", "none", "random", "frame"])
def test_pretrain_flops_match_flop_counter(name, over, decoder_mode):
    torch.manual_seed(0)
    spec = get_spec(name, **over)
    model = create_pretrain_model(name, attention="math", **over).eval()  # math: attention is matmuls
    grid = TokenGrid(*model.grid)
    batch = 2
    enc, dec = make_masks("tube", 0.9, decoder_mode, 0.5, batch, grid)
    video = torch.randn(batch, 3, spec.num_frames, spec.img_size, spec.img_size)
    with torch.no_grad():
        measured = _counted(lambda: model(video, enc, dec))
    fb = pretrain_flops(spec, decoder_mode=decoder_mode)
    assert measured == batch * fb.total
    assert fb.macs * 2 == fb.total and fb.total == fb.encoder + fb.decoder + fb.head


@pytest.mark.parametrize("decoder_mode", ["running_cell", "none"])
def test_random_encoder_mask_matches_flop_counter(decoder_mode):
    over = {"num_frames": 4, "img_size": 48}  # 2 x 6 x 6 = 72 tokens
    spec = get_spec("vit_tiny_debug", **over)
    model = create_pretrain_model("vit_tiny_debug", attention="math", **over).eval()
    enc, dec = make_masks("random", 0.8, decoder_mode, 0.5, 2, TokenGrid(*model.grid))
    with torch.no_grad():
        measured = _counted(lambda: model(torch.randn(2, 3, 4, 48, 48), enc, dec))
    fb = pretrain_flops(spec, decoder_mode=decoder_mode, encoder_ratio=0.8, encoder_mask="random")
    assert measured == 2 * fb.total
    assert fb != pretrain_flops(spec, decoder_mode=decoder_mode, encoder_ratio=0.8)  # 15 vs 16 visible


@pytest.mark.parametrize("name,over", CASES)
def test_parts_match_flop_counter(name, over):
    """Encoder / decoder / head split is right too (each part measured on its own module)."""
    spec = get_spec(name, **over)
    model = create_pretrain_model(name, attention="math", **over).eval()
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 1, TokenGrid(*model.grid))
    video = torch.randn(1, 3, spec.num_frames, spec.img_size, spec.img_size)
    fb = pretrain_flops(spec)
    with torch.no_grad():
        assert _counted(lambda: model.encoder(video, enc)) == fb.encoder
        x_vis = model.encoder(video, enc)
        head_in = torch.randn(1, int((~dec).sum()), spec.decoder_dim)
        assert _counted(lambda: model.decoder.head(head_in)) == fb.head
        full = _counted(lambda: model(video, enc, dec))
    assert full - fb.encoder - fb.head == fb.decoder
    assert x_vis.shape[1] < enc.shape[1]  # the encoder really ran on visible tokens only


def test_attention_excluded_is_smaller_by_the_two_matmuls():
    spec = get_spec("B")
    with_attn = pretrain_flops(spec, decoder_mode="none")
    without = pretrain_flops(spec, decoder_mode="none", attention_included=False)
    vis, dec_tokens = 160, 1568  # ViT-B: 8 x 20 visible; decoder sees every token in encoder-only mode
    expected = 12 * 4 * vis * vis * 768 + 4 * 4 * dec_tokens * dec_tokens * 384
    assert with_attn.total - without.total == expected


def test_classifier_flops_match_flop_counter():
    over = {"num_frames": 4, "img_size": 64}
    spec = get_spec("vit_tiny_debug", **over)
    model = create_classifier("vit_tiny_debug", 7, attention="math", **over).eval()
    video = torch.randn(3, 3, 4, 64, 64)
    with torch.no_grad():
        measured = _counted(lambda: model(video))
    assert measured == 3 * classifier_flops(spec, 7).total


def test_train_step_is_three_forwards_and_counts_backward():
    spec = get_spec("vit_tiny_debug")
    fwd = pretrain_flops(spec)
    step = train_step_flops(spec, batch_size=4)
    assert isinstance(step, FlopsBreakdown) and step.total == 12 * fwd.total
    # the 3x rule is exact for matmul-only models: check it against autograd's backward
    model = create_pretrain_model("vit_tiny_debug", attention="math")
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 4, TokenGrid(*model.grid))
    video = torch.randn(4, 3, 4, 32, 32, requires_grad=True)  # so the conv's input grad is counted too
    measured = _counted(lambda: model(video, enc, dec).sum().backward())
    assert measured == step.total


def _meta_vit_g_forward(model: torch.nn.Module) -> None:
    """ViT-g's forward on meta tensors, tube 0.9 + running cell 0.5 (boolean-mask gathers are data dependent and
    cannot run on meta, so the visible / kept token counts are fed as shapes, which is what the forward makes)."""
    video = torch.empty(1, 3, 16, 224, 224)
    vis, kept = 8 * 26, 2048 // 2
    if model.encoder.embed_visible_only:
        x = model.encoder.patch_embed(video, torch.zeros(1, vis, dtype=torch.long))
    else:
        x = model.encoder.patch_embed(video)
        assert x.shape == (1, 2048, 1408)
        x = x[:, :vis]
    x = model.encoder.norm(torch.nn.Sequential(*model.encoder.blocks)(x))
    x = model.encoder_to_decoder(x)
    x = torch.cat([x, model.mask_token.expand(1, kept, -1)], dim=1)
    out = model.decoder(x, kept)
    assert out.shape == (1, kept, 3 * 2 * 14 * 14)


def test_meta_device_vit_g_matches_counter():
    """ViT-g the authors' way (the conv over every token, the decoder MLP at 2234) built on the meta device (no
    memory): every part runs on meta tensors under the counter, which matches the paper's count."""
    spec = get_spec("g")
    with torch.device("meta"):
        model = create_pretrain_model("g", attention="math", embed_visible_only=False, decoder_mlp_align=1)
        fb = pretrain_flops(spec, embed_visible_only=False)
        with torch.no_grad():
            assert _counted(lambda: _meta_vit_g_forward(model)) == fb.total
    assert 263e9 < pretrain_flops(spec, decoder_mode="none", embed_visible_only=False).macs < 265e9  # 263.93 G
    assert 241e9 < fb.macs < 242.5e9  # paper: 241.61 G


def test_meta_device_vit_g_default_counts_what_runs():
    """The default model embeds the 208 visible tokens only and runs the decoder MLP at 2240: the counter sees
    both; the model FLOPs (what MFU counts) leave out only the padding's work on zeros."""
    spec = get_spec("g")
    with torch.device("meta"):
        model = create_pretrain_model("g", attention="math")
        with torch.no_grad():
            counted = _counted(lambda: _meta_vit_g_forward(model))
    assert counted == pretrain_flops(spec, decoder_mlp_align=64).total
    authors, ours = pretrain_flops(spec, embed_visible_only=False), pretrain_flops(spec)
    assert authors.encoder - ours.encoder == embed_flops(spec, 2048 - 208) == 2 * 1840 * 1408 * 1176
    assert ours.decoder == authors.decoder
    # padding: 6 zero features in fc1 and fc2 of the 4 decoder blocks, on 208 + 1024 tokens
    assert counted - ours.total == 4 * 2 * 2 * (208 + 1024) * 512 * 6
    assert 1.2e-2 < (authors.total - ours.total) / authors.total < 1.3e-2  # 1.3 % of the step skipped


def test_flops_module_imports_nothing_of_the_project():
    """Plain arithmetic: no circle through the models or objectives can start from it."""
    code = "import sys, vmae_ds.flops; print(sorted(m for m in sys.modules if m.startswith('vmae_ds')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['vmae_ds', 'vmae_ds.flops']"
    assert flops.RUNNING_CELL_RATIOS == RUNNING_CELL_RATIOS  # the copy kept to stay free of torch


def test_visible_only_embedding_matches_flop_counter():
    over = {"num_frames": 4, "img_size": 64}
    spec = get_spec("vit_tiny_debug", **over)
    enc, dec = make_masks("tube", 0.75, "running_cell", 0.5, 2, TokenGrid(2, 8, 8))
    counts = {}
    for visible_only in (True, False):
        model = create_pretrain_model("debug", attention="math", embed_visible_only=visible_only, **over)
        with torch.no_grad():
            counts[visible_only] = _counted(lambda m=model: m(torch.randn(2, 3, 4, 64, 64), enc, dec))
        assert counts[visible_only] == 2 * pretrain_flops(spec, encoder_ratio=0.75,
                                                          embed_visible_only=visible_only).total
    assert counts[False] - counts[True] == 2 * embed_flops(spec, 128 - 32)  # 2 clips, 96 hidden tokens each


def test_flops_grow_as_expected():
    spec = get_spec("B")
    none, rc50, rc75 = (pretrain_flops(spec, decoder_mode="none"), pretrain_flops(spec),
                        pretrain_flops(spec, decoder_ratio=0.75))
    assert none.encoder == rc50.encoder == rc75.encoder
    assert none.decoder > rc50.decoder > rc75.decoder
    with pytest.raises(ValueError, match="running_cell decoder_ratio"):
        pretrain_flops(spec, decoder_ratio=0.6)
    with pytest.raises(ValueError, match="decoder_mode"):
        pretrain_flops(spec, decoder_mode="tube")


def test_cli_table_and_json(capsys):
    assert main(["--models", "B", "g"]) == 0
    out = capsys.readouterr().out
    assert "encoder-only" in out and "dual (running cell 0.5)" in out and "263.93" in out
    assert main(["--models", "debug", "--frames", "8", "--img-size", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    spec = get_spec("debug", num_frames=8, img_size=64)
    assert [r["total"] for r in rows] == [pretrain_flops(spec, decoder_mode="none").total,
                                          pretrain_flops(spec).total]
    assert rows[0]["tokens"] == 4 * 8 * 8
    with pytest.raises(SystemExit):
        main(["--models", "nope"])


@pytest.mark.parametrize("ratio", ["1.5", "1.0", "-0.1"])
def test_cli_refuses_an_encoder_ratio_outside_0_1(capsys, ratio):
    with pytest.raises(SystemExit) as e:  # used to print negative FLOPs
        main(["--models", "B", "--encoder-ratio", ratio])
    assert e.value.code == 2
    assert f"encoder mask ratio must be in [0, 1), got {float(ratio)}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="encoder mask ratio"):
        pretrain_flops(get_spec("B"), encoder_ratio=float(ratio))
