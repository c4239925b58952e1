"""Same weights + same masks -> same outputs and loss as the authors' official implementation (float32).

`official_videomae_v2` re-implements the official model eagerly with its module names; its state dict
must load 1:1 (strict) into ours, and both must agree to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official_videomae_v2 import (
    PretrainVisionTransformer,
    RunningCellMaskingGenerator,
    TubeMaskingGenerator,
    get_sinusoid_encoding_table,
    official_labels,
    official_loss,
)

from vmae_ds.losses import pixel_target, reconstruction_loss
from vmae_ds.masking import TokenGrid, running_cell_mask
from vmae_ds.models import create_pretrain_model, get_spec
from vmae_ds.models.pos_embed import sinusoid_table

# tiny debug model, and a ViT-B-shaped one (full width / heads / mlp) with 2 blocks, 4 frames, 96 px
CONFIGS = {
    "tiny": ("vit_tiny_debug", {}),
    "base_shaped": ("vit_base_patch16", {"depth": 2, "decoder_depth": 2, "num_frames": 4, "img_size": 96}),
}


def _official(name: str, over: dict) -> PretrainVisionTransformer:
    s = get_spec(name, **over)
    return PretrainVisionTransformer(
        img_size=s.img_size, patch_size=s.patch_size, encoder_embed_dim=s.dim, encoder_depth=s.depth,
        encoder_num_heads=s.num_heads, decoder_num_classes=3 * s.tubelet_size * s.patch_size**2,
        decoder_embed_dim=s.decoder_dim, decoder_depth=s.decoder_depth, decoder_num_heads=s.decoder_heads,
        mlp_ratio=s.mlp_ratio, qkv_bias=True, tubelet_size=s.tubelet_size, all_frames=s.num_frames)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter (biases, norms, q/v biases too) so any swap would show.

    Norm weights get 1 + noise, other tensors small noise, to keep activations in a sane range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = ".norm" in name and name.endswith(".weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.05 * noise)


def _official_masks(grid: tuple[int, int, int], batch: int, dual: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """Masks as the official dataset produces them (numpy, 1 = hidden / dropped), stacked as bools."""
    np.random.seed(seed)
    tube = TubeMaskingGenerator(grid, 0.9)
    cell = RunningCellMaskingGenerator(grid, 0.5)
    enc = np.stack([tube() for _ in range(batch)])
    dec = np.stack([cell().reshape(-1) for _ in range(batch)]) if dual else 1 - enc  # engine: 1 - encoder mask
    return torch.from_numpy(enc).bool(), torch.from_numpy(dec).bool()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    name, over = CONFIGS[request.param]
    torch.manual_seed(0)
    official = _official(name, over)
    _randomise(official, seed=1)
    ours = create_pretrain_model(name, attention="math", **over)
    return name, over, official.eval(), ours.eval()


def test_state_dict_keys_match_one_to_one(pair):
    _, _, official, ours = pair
    keys = list(official.state_dict())
    assert len(keys) == len(set(keys)) and set(keys) == set(ours.state_dict())  # 1:1 (order is free)
    for k, v in official.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    missing, unexpected = ours.load_state_dict(official.state_dict(), strict=True)
    assert not missing and not unexpected
    # the fixed sinusoid tables are not in either state dict, and agree with the numpy table
    assert not any("pos_embed" in k for k in ours.state_dict())
    assert torch.equal(ours.encoder.pos_embed, official.encoder.pos_embed)
    assert torch.equal(ours.decoder.pos_embed, official.pos_embed)


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
@pytest.mark.parametrize("dual", [True, False], ids=["dual", "encoder_only"])
def test_outputs_and_loss_match_official(pair, dual, kernel):
    name, over, official, _ = pair
    ours = create_pretrain_model(name, attention=kernel, **over).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    s = get_spec(name, **over)
    grid = ours.grid
    batch = 3
    enc, dec = _official_masks(grid, batch, dual, seed=7)
    video = torch.randn(batch, 3, s.num_frames, s.img_size, s.img_size, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        ref = official(video, enc, dec)
        out = ours(video, enc, dec if dual else None)  # ours: None = encoder-only masking
    n_keep = int((~dec[0]).sum())
    assert out.shape == ref.shape == (batch, n_keep, 3 * s.tubelet_size * s.patch_size**2)
    assert ref.abs().mean() > 0.1  # a non-degenerate output, so the comparison means something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    labels = official_labels(video, dec, s.patch_size, s.tubelet_size)
    ref_loss = official_loss(ref, labels, enc, dec)
    target = pixel_target(video, s.patch_size, s.tubelet_size)
    loss = reconstruction_loss(out, target, enc, dec if dual else None)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # and our loss on the official outputs equals the official loss on them (the loss alone agrees)
    torch.testing.assert_close(reconstruction_loss(ref, target, enc, dec if dual else None), ref_loss,
                               atol=1e-6, rtol=1e-6)
    if not dual:  # encoder-only: every predicted token carries loss
        assert int(enc[0].sum()) == n_keep


def test_gradients_match_official():
    name, over = CONFIGS["tiny"]
    official = _official(name, over)
    _randomise(official, seed=5)
    ours = create_pretrain_model(name, attention="math", **over)
    ours.load_state_dict(official.state_dict(), strict=True)
    enc, dec = _official_masks(ours.grid, 2, True, seed=11)
    video = torch.randn(2, 3, 4, 32, 32)
    labels = official_labels(video, dec, 8)
    official_loss(official(video, enc, dec), labels, enc, dec).backward()
    reconstruction_loss(ours(video, enc, dec), pixel_target(video, 8, 2), enc, dec).backward()
    theirs = dict(official.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[k].grad, atol=1e-5, rtol=1e-4, msg=k)


def test_running_cell_patterns_equal_official():
    """The official generator's 4 precomputed maps are exactly the 4 patterns our generator draws."""
    for grid, ratio in (((8, 14, 14), 0.5), ((4, 4, 6), 0.25), ((4, 4, 6), 0.75), ((2, 16, 16), 0.5)):
        gen = RunningCellMaskingGenerator(grid, ratio)
        theirs = {tuple(m.reshape(-1).astype(bool).tolist()) for m in gen.all_mask_maps}
        assert len(theirs) == 4
        draws = running_cell_mask(64, TokenGrid(*grid), ratio, generator=torch.Generator().manual_seed(0))
        ours = {tuple(row.tolist()) for row in draws}
        assert ours == theirs, (grid, ratio)


def test_tube_masks_match_official_distribution():
    np.random.seed(0)
    gen = TubeMaskingGenerator((8, 14, 14), 0.9)
    m = gen().reshape(8, 196)
    assert (m == m[0]).all() and int(m[0].sum()) == 176  # 20 visible per frame for ViT-B


def test_sinusoid_table_matches_numpy_reference():
    for n, d in ((32, 48), (72, 768), (50, 88)):
        torch.testing.assert_close(sinusoid_table(n, d), get_sinusoid_encoding_table(n, d), atol=0, rtol=0)
