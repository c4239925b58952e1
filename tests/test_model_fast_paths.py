"""The model's two ways of running less or aligned work give the authors' values exactly (float64): the
visible-only tubelet embedding against the Conv3d-then-gather, and the decoder MLP padded to an aligned
width against the authors' width, outputs, gradients and AdamW steps alike, with the authors' shapes kept."""

from __future__ import annotations

import pytest
import torch

from vmae_ds.masking import TokenGrid, make_masks, select_tokens
from vmae_ds.models import create_pretrain_model
from vmae_ds.models.vit import Mlp, TubeletConv

# ViT-g's widths (decoder MLP hidden int(512 * 48 / 11) = 2234) at depth 1 on a 2 x 4 x 4 grid
G_SHAPED = {"depth": 1, "decoder_depth": 1, "num_frames": 4, "img_size": 56}
AUTHORS = {"embed_visible_only": False, "decoder_mlp_align": 1}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)


def test_visible_only_embedding_equals_conv_then_gather():
    torch.manual_seed(0)
    conv = TubeletConv(3, 24, kernel_size=(2, 8, 8), stride=(2, 8, 8)).double()
    video = torch.randn(3, 3, 6, 32, 40, dtype=torch.float64, requires_grad=True)  # grid 3 x 4 x 5: not square
    n = 3 * 4 * 5
    visible = torch.stack([torch.randperm(n)[:17].sort().values for _ in range(3)])  # other tokens per clip

    full = conv(video)
    ref = full.gather(1, visible.unsqueeze(-1).expand(-1, -1, 24))
    ref_grads = torch.autograd.grad((ref * ref.detach().cos()).sum(), (conv.weight, conv.bias, video))
    out = conv(video, visible)
    grads = torch.autograd.grad((out * ref.detach().cos()).sum(), (conv.weight, conv.bias, video))

    assert full.shape == (3, n, 24) and out.shape == (3, 17, 24)
    _close(out, ref, "embedding")
    for name, g, r in zip(("weight", "bias", "video"), grads, ref_grads):
        _close(g, r, f"grad of {name}")
    assert ref_grads[0].abs().sum() > 0 and (ref_grads[2] == 0).any()  # hidden tubelets get no input gradient


def test_padded_mlp_runs_aligned_with_the_authors_values_and_shapes():
    torch.manual_seed(1)
    plain, padded = Mlp(512, 2234).double(), Mlp(512, 2234, align=64).double()
    padded.load_state_dict(plain.state_dict())
    assert {k: tuple(v.shape) for k, v in padded.state_dict().items()} == {
        "fc1.weight": (2234, 512), "fc1.bias": (2234,), "fc2.weight": (512, 2234), "fc2.bias": (512,)}
    widths = []
    padded.act.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    x = torch.randn(2, 9, 512, dtype=torch.float64)
    out, ref = padded(x), plain(x)
    assert widths == [2240]  # the GEMMs ran at the aligned width
    _close(out, ref, "mlp output")
    out.square().sum().backward()
    ref.square().sum().backward()
    for (k, p), q in zip(padded.named_parameters(), plain.parameters()):
        assert p.grad.shape == q.grad.shape
        _close(p.grad, q.grad, f"grad of {k}")
    with pytest.raises(ValueError, match="align must be >= 1"):
        Mlp(8, 8, align=0)


@pytest.fixture(scope="module")
def g_pair():
    """ViT-g-shaped model the authors' way and the default way, the same weights, float64."""
    torch.manual_seed(2)
    authors = create_pretrain_model("g", attention="math", **G_SHAPED, **AUTHORS).double()
    ours = create_pretrain_model("g", attention="math", **G_SHAPED).double()
    ours.load_state_dict(authors.state_dict(), strict=True)  # the same keys and shapes
    return authors, ours


def test_default_model_keeps_the_authors_parameters(g_pair):
    authors, ours = g_pair
    assert ours.encoder.embed_visible_only and not authors.encoder.embed_visible_only
    assert ours.decoder.blocks[0].mlp.fc1.pad == 6 and authors.decoder.blocks[0].mlp.fc1.pad == 0
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in authors.state_dict().items()}
    assert ours.state_dict()["decoder.blocks.0.mlp.fc1.weight"].shape == (2234, 512)
    assert ours.encoder.blocks[0].mlp.fc1.pad == 0  # 6144 is aligned: the encoder is untouched


def test_default_model_trains_like_the_authors_way(g_pair):
    """Outputs, every gradient, and the weights after AdamW steps with weight decay: equal."""
    authors, ours = g_pair
    grid = TokenGrid(*ours.grid)
    models = (authors, ours)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05) for m in models]
    gen = torch.Generator().manual_seed(3)
    for step in range(2):
        enc, dec = make_masks("tube", 0.75, "running_cell", 0.5, 2, grid, generator=gen)
        video = torch.randn(2, 3, 4, 56, 56, dtype=torch.float64, generator=gen)
        sel = select_tokens(enc, dec)
        outs = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            out = m(video, sel)
            out.square().mean().backward()
            outs.append(out)
        _close(outs[1], outs[0], f"step {step} output")
        theirs = dict(authors.named_parameters())
        for k, p in ours.named_parameters():
            _close(p.grad, theirs[k].grad, f"step {step} grad of {k}")
        for opt in opts:
            opt.step()
    theirs = dict(authors.named_parameters())
    for k, p in ours.named_parameters():
        _close(p.detach(), theirs[k].detach(), f"weights of {k} after the steps")
