"""Model zoo: sizes, meta-device builds, overrides, output shapes, errors, activation checkpointing."""

from __future__ import annotations

import time

import pytest
import torch
from timm.layers import DropPath

from vmae_ds.masking import TokenGrid, make_masks
from vmae_ds.models import MODELS, count_params, create_classifier, create_pretrain_model, get_spec
from vmae_ds.models.pos_embed import sinusoid_table


def _expected_params(name: str) -> tuple[int, int]:
    """(total, encoder) parameters, counted from the architecture description, not from the modules."""
    s = get_spec(name)
    out = 3 * s.tubelet_size * s.patch_size**2

    def block(d: int) -> int:
        h = int(d * s.mlp_ratio)
        return 3 * d * d + 2 * d + d * d + d + d * h + h + h * d + d + 4 * d  # qkv, q/v bias, proj, mlp, norms

    d, dd = s.dim, s.decoder_dim
    encoder = d * out + d + s.depth * block(d) + 2 * d
    decoder = s.decoder_depth * block(dd) + 2 * dd + dd * out + out
    return encoder + d * dd + dd + decoder, encoder


@pytest.mark.parametrize("name", [n for n in MODELS if n != "vit_tiny_debug"])
def test_param_counts_on_meta(name):
    with torch.device("meta"):
        model = create_pretrain_model(name)
    total, encoder = _expected_params(name)
    assert count_params(model) == total
    assert count_params(model.encoder) == encoder
    assert next(model.parameters()).is_meta


def test_published_param_counts():
    with torch.device("meta"):
        b = create_pretrain_model("B")
        g = create_pretrain_model("g")
    assert round(count_params(b) / 1e6, 2) == 94.21
    assert round(count_params(g) / 1e6, 2) == 1026.31
    assert round(count_params(g.encoder) / 1e6, 2) == 1011.61
    assert g.decoder.blocks[0].mlp.fc1.out_features == 2234  # int(512 * 48 / 11)
    assert g.encoder.blocks[0].mlp.fc1.out_features == 6144
    assert g.grid == (8, 16, 16) and b.grid == (8, 14, 14)
    assert g.encoder.blocks[0].attn.num_heads == 16 and g.decoder.head.out_features == 3 * 2 * 14 * 14


def test_vit_g_meta_build_is_fast():
    start = time.perf_counter()
    with torch.device("meta"):
        model = create_pretrain_model("g")
    assert time.perf_counter() - start < 5.0
    assert all(p.is_meta for p in model.parameters())


def test_meta_to_empty_init_weights():
    with torch.device("meta"):
        model = create_pretrain_model("S", num_frames=4, img_size=96)
    model.to_empty(device="cpu")
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    torch.testing.assert_close(model.encoder.pos_embed, sinusoid_table(2 * 6 * 6, 384), rtol=0, atol=0)
    torch.testing.assert_close(model.decoder.pos_embed, sinusoid_table(2 * 6 * 6, 192), rtol=0, atol=0)
    # official init: LayerNorm 1/0, Linear biases 0, q/v biases 0, xavier weights, mask token std .02
    blk = model.encoder.blocks[0]
    assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)
    assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.mlp.fc1.bias == 0)
    bound = (6 / (384 + 3 * 384)) ** 0.5
    w = blk.attn.qkv.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and abs(float(w.std()) - bound / 3**0.5) < 1e-3
    # the authors' trunc_normal_ wrapper cuts at +-1 std (timm's default, +-2 absolute, would not cut at all):
    # a normal truncated at +-1 sigma has std 0.538 sigma
    mt = model.mask_token.detach()
    assert mt.abs().max() <= 0.02 and 0.0095 < float(mt.std()) < 0.0120, (mt.abs().max(), mt.std())
    # encoder_to_decoder keeps PyTorch's default Linear init (the authors never apply theirs to it):
    # kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)), not xavier's U(+-sqrt(6 / (fan_in + fan_out)))
    e2d = model.encoder_to_decoder.weight.detach()
    # (xavier's bound here is sqrt(6 / 576) = 0.102: its 73 k draws would exceed 1/sqrt(384) = 0.051)
    assert e2d.abs().max() <= 384**-0.5 and e2d.abs().max() > 0.95 * 384**-0.5


def test_official_init_of_the_classifier_head_and_linears():
    from vmae_ds.models import create_classifier

    torch.manual_seed(0)
    m = create_classifier("S", num_classes=400, num_frames=4, img_size=96)
    w = m.blocks[0].mlp.fc1.weight.detach()  # trunc-normal(.02) cut at +-.02: std .0108
    assert w.abs().max() <= 0.02 and abs(float(w.std()) - 0.538 * 0.02) < 5e-4
    head = m.head.weight.detach()  # the same, scaled by 0.001
    assert head.abs().max() <= 2e-5 and abs(float(head.std()) - 0.538 * 2e-5) < 1e-6


def test_overrides():
    m = create_pretrain_model("vit_tiny_debug", num_frames=8, img_size=48, tubelet_size=4, decoder_depth=3,
                              decoder_dim=24, decoder_heads=4, drop_path_rate=0.2)
    assert m.grid == (2, 6, 6) and m.encoder.num_tokens == 72
    assert m.encoder.patch_embed.proj.kernel_size == (4, 8, 8)
    assert len(m.decoder.blocks) == 3 and m.mask_token.shape == (1, 1, 24)
    assert m.decoder.blocks[0].attn.num_heads == 4
    assert m.decoder.head.out_features == 3 * 4 * 8 * 8
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in m.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.2])  # linear over depth
    # the authors hand the decoder the same drop_path_rate, spread over its own depth
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in m.decoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 2, TokenGrid(*m.grid))
    assert m(torch.randn(2, 3, 8, 48, 48), enc, dec).shape == (2, 36, 3 * 4 * 8 * 8)


@pytest.mark.parametrize("decoder_kind,n_out", [("running_cell", 16), ("none", 28), ("frame", 16)])
def test_pretrain_output_shapes(decoder_kind, n_out):
    model = create_pretrain_model("vit_tiny_debug")
    enc, dec = make_masks("tube", 0.9, decoder_kind, 0.5, 3, TokenGrid(*model.grid))  # 2 x 14 hidden of 32
    out = model(torch.randn(3, 3, 4, 32, 32), enc, dec)
    assert out.shape == (3, n_out, 3 * 2 * 8 * 8)
    assert torch.isfinite(out).all()


def test_classifier_shape_and_keys():
    clf = create_classifier("vit_tiny_debug", num_classes=11, head_drop_rate=0.1)
    assert clf(torch.randn(2, 3, 4, 32, 32)).shape == (2, 11)
    keys = set(clf.state_dict())
    assert {"fc_norm.weight", "head.weight", "patch_embed.proj.weight", "blocks.0.attn.q_bias"} <= keys
    assert not any(k.startswith(("encoder.", "norm.")) for k in keys)
    assert float(clf.head.weight.detach().abs().max()) < 0.001  # trunc_normal .02 scaled by 0.001
    with torch.device("meta"):
        big = create_classifier("g", num_classes=710)
    assert round(count_params(big) / 1e6, 1) > 1000


def test_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_nope'"):
        create_pretrain_model("vit_nope")
    with pytest.raises(ValueError, match=r"unknown model override\(s\) \['frames'\]"):
        create_pretrain_model("vit_tiny_debug", frames=8)
    with pytest.raises(ValueError, match="must be multiples of"):
        create_pretrain_model("vit_tiny_debug", img_size=36)
    with pytest.raises(ValueError, match="must be multiples of"):
        get_spec("B", num_frames=15)
    with pytest.raises(ValueError, match="attention must be one of"):
        create_pretrain_model("vit_tiny_debug", attention="xformers")
    with pytest.raises(ValueError, match="none\\|full\\|selective"):
        create_pretrain_model("vit_tiny_debug").set_activation_checkpointing("some")
    with pytest.raises(ValueError, match="num_blocks"):
        create_pretrain_model("vit_tiny_debug").set_activation_checkpointing("selective", num_blocks=5)


def _loss_and_grads(model, video, enc, dec):
    model.zero_grad()
    out = model(video, enc, dec)
    (out.square().mean()).backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode,num_blocks", [("full", 0), ("selective", 1), ("selective", 2)])
def test_activation_checkpointing_is_exact(mode, num_blocks):
    torch.manual_seed(0)
    model = create_pretrain_model("vit_tiny_debug", attention="math", depth=3)
    enc, dec = make_masks("tube", 0.75, "running_cell", 0.5, 2, TokenGrid(*model.grid))
    video = torch.randn(2, 3, 4, 32, 32)
    ref_out, ref_grads = _loss_and_grads(model, video, enc, dec)
    calls = []

    def counting_checkpoint(fn, *args):  # our own wrapper around torch's checkpoint, to see it is used
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    model.set_activation_checkpointing(mode, num_blocks, fn=counting_checkpoint)
    out, grads = _loss_and_grads(model, video, enc, dec)
    assert len(calls) == (3 + 1 if mode == "full" else num_blocks)
    assert torch.equal(out, ref_out)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0, msg=k)
    model.set_activation_checkpointing("none")
    calls.clear()
    _loss_and_grads(model, video, enc, dec)
    assert not calls


def test_classifier_checkpointing_is_exact():
    torch.manual_seed(0)
    clf = create_classifier("vit_tiny_debug", num_classes=5, attention="math")
    video = torch.randn(2, 3, 4, 32, 32)
    ref = clf(video)
    ref.sum().backward()
    ref_grad = {k: p.grad.clone() for k, p in clf.named_parameters()}
    clf.zero_grad()
    with pytest.raises(ValueError, match="none\\|full\\|selective"):
        clf.set_activation_checkpointing("all")
    with pytest.raises(ValueError, match="num_blocks"):
        clf.set_activation_checkpointing("selective", num_blocks=3)
    clf.set_activation_checkpointing("full")
    out = clf(video)
    out.sum().backward()
    assert torch.equal(out, ref)
    for k, p in clf.named_parameters():
        torch.testing.assert_close(p.grad, ref_grad[k], rtol=0, atol=0, msg=k)
