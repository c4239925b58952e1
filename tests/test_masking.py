"""Mask generators: exact counts, structure, uniformity, reproducibility, errors."""

from __future__ import annotations

import pytest
import torch

from vmae_ds.masking import (
    TokenGrid,
    decoder_kept,
    frame_mask,
    loss_positions,
    make_decoder_mask,
    make_encoder_mask,
    make_masks,
    random_mask,
    running_cell_mask,
    tube_mask,
)

B_GRID = TokenGrid(8, 14, 14)  # ViT-B, 16 x 224 x 224, patch 16
G_GRID = TokenGrid(8, 16, 16)  # ViT-g, patch 14
SMALL = TokenGrid(4, 6, 8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid", [B_GRID, G_GRID, SMALL])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_exact_hidden_counts_encoder(grid, ratio):
    hw = grid.h * grid.w
    tube = tube_mask(16, grid, ratio, _gen())
    rand = random_mask(16, grid, ratio, _gen())
    assert tube.shape == rand.shape == (16, grid.n) and tube.dtype == rand.dtype == torch.bool
    assert (tube.sum(1) == grid.t * int(ratio * hw)).all()
    assert (rand.sum(1) == int(ratio * grid.n)).all()


def test_vit_b_and_g_visible_counts():
    assert ((~tube_mask(4, B_GRID, 0.9, _gen())).sum(1) == 160).all()  # 20 per frame
    assert ((~tube_mask(4, G_GRID, 0.9, _gen())).sum(1) == 208).all()  # 26 per frame


@pytest.mark.parametrize("grid", [B_GRID, SMALL])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_exact_hidden_counts_decoder(grid, ratio):
    rc = running_cell_mask(16, grid, ratio, _gen())
    assert (rc.sum(1) == grid.n // 4 * int(4 * ratio)).all()
    if ratio == 0.5:
        fr = frame_mask(16, grid, ratio, _gen())
        assert (fr.sum(1) == grid.n // 2).all()
    rnd = make_decoder_mask("random", 16, grid, ratio, _gen())
    assert (rnd.sum(1) == int(ratio * grid.n)).all()
    assert make_decoder_mask("none", 16, grid, ratio) is None


def test_tube_constant_over_time_and_differs_between_samples():
    m = tube_mask(32, B_GRID, 0.9, _gen()).view(32, B_GRID.t, -1)
    assert (m == m[:, :1]).all()
    assert len({tuple(row.tolist()) for row in m[:, 0]}) > 1
    r = random_mask(32, B_GRID, 0.9, _gen()).view(32, B_GRID.t, -1)
    assert not (r == r[:, :1]).all()  # the random mask is not a tube


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_structure(ratio):
    grid = TokenGrid(6, 4, 6)
    k = int(4 * ratio)
    m = running_cell_mask(64, grid, ratio, _gen()).view(64, grid.t, grid.h // 2, 2, grid.w // 2, 2)
    cells = m.permute(0, 1, 2, 4, 3, 5).reshape(64, grid.t, -1, 4)  # (b, t, cell, position in cell)
    assert (cells.sum(-1) == k).all()  # every cell hides int(4r) of its 4 positions at every t
    assert (cells == cells[:, :, :1]).all()  # all cells of a frame share the pattern
    # hidden pattern shifts by one position (cyclically, flattened 2x2 order) per temporal index
    for t in range(1, grid.t):
        assert torch.equal(cells[:, t, 0], torch.roll(cells[:, t - 1, 0], shifts=-1, dims=-1))
    patterns = {tuple(row.tolist()) for row in m.reshape(64, -1)}
    assert len(patterns) == 4  # exactly 4 start offsets
    # each frame's cell pattern is a cyclic rotation of k hidden then 4-k kept positions
    base = torch.tensor([True] * k + [False] * (4 - k))
    rotations = {tuple(torch.roll(base, s).tolist()) for s in range(4)}
    assert {tuple(row.tolist()) for row in cells[:, :, 0].reshape(-1, 4)} == rotations


def test_running_cell_offsets_uniform():
    m = running_cell_mask(4000, TokenGrid(2, 2, 2), 0.5, _gen())
    uniq, freq = torch.unique(m, dim=0, return_counts=True)
    assert len(uniq) == 4
    expected = 1000.0
    chi2 = float(((freq.float() - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # chi-square, 3 dof, p ~ 0.001


@pytest.mark.parametrize("grid", [TokenGrid(4, 2, 2), TokenGrid(8, 4, 4)])
def test_frame_mask_parity(grid):
    m = frame_mask(200, grid, 0.5, _gen()).view(200, grid.t, -1)
    per_t = m.all(-1)
    assert (m.any(-1) == per_t).all()  # whole tubelet-frames only
    even_hidden = per_t[:, 0::2].all(1) & ~per_t[:, 1::2].any(1)
    odd_hidden = per_t[:, 1::2].all(1) & ~per_t[:, 0::2].any(1)
    assert (even_hidden ^ odd_hidden).all()
    assert 60 < int(even_hidden.sum()) < 140  # both parities drawn


@pytest.mark.parametrize("kind", ["tube", "random"])
def test_uniform_coverage_encoder(kind):
    """Each position is hidden with frequency ~ ratio: chi-square-ish bound over positions."""
    grid, ratio, draws = TokenGrid(2, 6, 6), 0.75, 4000
    freq = make_encoder_mask(kind, draws, grid, ratio, _gen(1)).float().mean(0)
    p = int(ratio * 36) / 36 if kind == "tube" else int(ratio * grid.n) / grid.n
    sd = (p * (1 - p) / draws) ** 0.5
    z = (freq - p) / sd
    assert z.abs().max() < 5.0
    assert float((z**2).mean()) < 2.0  # mean chi-square per position ~ 1 (correlations make it <= ~1)


def test_uniform_coverage_random_decoder():
    grid, draws = TokenGrid(2, 4, 4), 4000
    freq = make_decoder_mask("random", draws, grid, 0.5, _gen(2)).float().mean(0)
    z = (freq - 0.5) / (0.25 / draws) ** 0.5
    assert z.abs().max() < 5.0


def test_running_cell_coverage_is_exactly_ratio_on_average():
    freq = running_cell_mask(4000, TokenGrid(4, 4, 4), 0.25, _gen(3)).float().mean(0)
    assert (freq - 0.25).abs().max() < 0.04


def test_seeded_reproducibility():
    a = make_masks("tube", 0.9, "running_cell", 0.5, 8, B_GRID, generator=_gen(42))
    b = make_masks("tube", 0.9, "running_cell", 0.5, 8, B_GRID, generator=_gen(42))
    c = make_masks("tube", 0.9, "running_cell", 0.5, 8, B_GRID, generator=_gen(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    for kind in ("random", "frame"):
        assert torch.equal(make_decoder_mask(kind, 8, SMALL, 0.5, _gen(5)),
                           make_decoder_mask(kind, 8, SMALL, 0.5, _gen(5)))


def test_device_param():
    m = tube_mask(2, SMALL, 0.9, device="cpu")
    assert m.device.type == "cpu"
    meta = running_cell_mask(2, SMALL, 0.5, device=torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (2, SMALL.n)
    if torch.cuda.is_available():
        g = torch.Generator(device="cuda").manual_seed(0)
        for kind in ("tube", "random"):
            assert make_encoder_mask(kind, 2, SMALL, 0.9, g, device="cuda").is_cuda


def test_loss_positions_about_45_percent_for_vit_b():
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 64, B_GRID, generator=_gen(0))
    kept = decoder_kept(enc, dec)
    lp = loss_positions(enc, dec)
    assert lp.shape == (64, B_GRID.n // 2)
    # loss positions are exactly the encoder-hidden AND decoder-kept tokens, in ascending order
    assert torch.equal(lp.sum(1), (enc & ~dec).sum(1))
    assert torch.equal(lp, enc[kept].view(64, -1))
    frac = (enc & ~dec).float().sum(1) / B_GRID.n
    assert 0.40 < float(frac.min()) and float(frac.max()) < 0.50
    assert abs(float(frac.mean()) - 0.45) < 0.01


def test_encoder_only_loss_on_all_kept():
    enc, dec = make_masks("tube", 0.9, "none", 0.5, 4, B_GRID, generator=_gen(0))
    assert dec is None
    assert torch.equal(decoder_kept(enc, None), enc)
    assert loss_positions(enc, None).all() and loss_positions(enc, None).shape == (4, 8 * 176)


def test_illegal_ratios_and_kinds():
    with pytest.raises(ValueError, match=r"running_cell ratio must be one of \(0.25, 0.5, 0.75\), got 0.6"):
        running_cell_mask(1, SMALL, 0.6)
    with pytest.raises(ValueError, match="even token grid"):
        running_cell_mask(1, TokenGrid(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="frame mask supports ratio 0.5 only, got 0.75"):
        frame_mask(1, SMALL, 0.75)
    with pytest.raises(ValueError, match="even number of tubelet-frames"):
        frame_mask(1, TokenGrid(3, 2, 2), 0.5)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"tube mask ratio must be in \[0, 1\), got {bad}"):
            tube_mask(1, SMALL, bad)
        with pytest.raises(ValueError, match=rf"random mask ratio must be in \[0, 1\), got {bad}"):
            make_decoder_mask("random", 1, SMALL, bad)
    assert not random_mask(1, SMALL, 0.0).any()  # ratio 0 is legal: nothing hidden
    with pytest.raises(ValueError, match="encoder mask must be one of"):
        make_encoder_mask("running_cell", 1, SMALL, 0.9)
    with pytest.raises(ValueError, match="decoder mask must be one of"):
        make_decoder_mask("tube", 1, SMALL, 0.5)


def test_readme_token_counts_for_vit_b():
    """README: 1568 tokens; tube 0.9 hides 1408 (what encoder-only masking predicts); the running cell
    keeps 784 for the decoder, 704 of them hidden from the encoder (the loss tokens, about 45%)."""
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, batch=2, grid=TokenGrid(8, 14, 14))
    assert enc.shape == (2, 1568)
    assert enc.sum(1).tolist() == [1408, 1408]
    assert (~dec).sum(1).tolist() == [784, 784]
    assert (enc & ~dec).sum(1).tolist() == [704, 704]
