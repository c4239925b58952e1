"""Reconstruction target and loss against hand-computed values and naive loop implementations."""

from __future__ import annotations

import statistics

import pytest
import torch

from vmae_ds.losses import IMAGENET_MEAN, IMAGENET_STD, patchify, pixel_target, reconstruction_loss
from vmae_ds.masking import TokenGrid, make_masks


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels (B, C, T, H, W) -> the model's ImageNet-normalised input."""
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (raw - m) / s


def test_target_hand_computed_single_token():
    # one token: tubelet 2 x 2 x 2 pixels; channel c's pixel (t, y, x) = (c + 1) * k / 10, k = 4t + 2y + x
    raw = torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64)
    for c in range(3):
        for t in range(2):
            for y in range(2):
                for x in range(2):
                    raw[0, c, t, y, x] = (c + 1) * (4 * t + 2 * y + x) / 10
    target = pixel_target(_normalise(raw), patch_size=2, tubelet_size=2)
    assert target.shape == (1, 1, 2 * 2 * 2 * 3) and target.dtype == torch.float32
    # values k/10 * (c+1), k = 0..7: mean 0.35 (c+1), unbiased std (c+1) * 0.1 * sqrt(6) = (c+1) * 0.244949
    for k in range(8):
        for c in range(3):
            expected = (k / 10 - 0.35) * (c + 1) / ((c + 1) * 0.1 * 6**0.5 + 1e-6)
            # flattened (t p p c): pixel k, then channel
            assert target[0, 0, k * 3 + c].item() == pytest.approx(expected, abs=2e-5)
    # same normalised values for every channel here (up to the 1e-6), proving channel-last interleaving
    assert torch.allclose(target[0, 0, 0::3], target[0, 0, 2::3], atol=1e-5)
    assert target[0, 0, 0].item() == pytest.approx(-0.35 / (0.1 * 6**0.5), abs=1e-4)  # (0 - mean) / std


def test_target_undoes_imagenet_normalisation():
    """Per-token standardisation is affine-invariant, so only the +1e-6 shows whether the ImageNet
    normalisation was undone: a token with a tiny pixel spread (1e-6 steps in [0, 1] units) tells."""
    raw = torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64)
    raw[0, :] = 0.5 + torch.arange(8, dtype=torch.float64).view(2, 2, 2) * 1e-6
    target = pixel_target(_normalise(raw), patch_size=2, tubelet_size=2).view(8, 3)
    sd = 1e-6 * 6**0.5  # unbiased std of 0..7 steps of 1e-6
    expected = 7 * (sd / (sd + 1e-6)) ** 2  # sum of squares of (v - mean) / (std + eps) over 8 pixels
    # without undoing it, the std would be sd / 0.229 and the sum ~5.85
    torch.testing.assert_close(target.square().sum(0), torch.full((3,), expected, dtype=torch.float32), rtol=0.02,
                               atol=0)


def test_patchify_order_matches_naive_indexing():
    b, c, t, h, w, p, tub = 2, 3, 4, 6, 4, 2, 2
    video = torch.randn(b, c, t, h, w)
    out = patchify(video, p, tub)
    assert out.shape == (b, (t // tub) * (h // p) * (w // p), tub * p * p, c)
    for bi in range(b):
        n = 0
        for tt in range(t // tub):
            for hh in range(h // p):
                for ww in range(w // p):  # tokens in (t, h, w) order
                    k = 0
                    for i in range(tub):
                        for y in range(p):
                            for x in range(p):  # pixels in (t, p, p) order
                                for ci in range(c):
                                    assert out[bi, n, k, ci] == video[bi, ci, tt * tub + i, hh * p + y, ww * p + x]
                                k += 1
                    n += 1


def _naive_target(video: torch.Tensor, p: int, tub: int) -> list:
    raw = video.double() * torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1, 1) + torch.tensor(
        IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1, 1)
    b, c, t, h, w = raw.shape
    tokens = []
    for bi in range(b):
        per_b = []
        for tt in range(t // tub):
            for hh in range(h // p):
                for ww in range(w // p):
                    chans = []
                    for ci in range(c):
                        vals = [raw[bi, ci, tt * tub + i, hh * p + y, ww * p + x].item()
                                for i in range(tub) for y in range(p) for x in range(p)]
                        mu, sd = statistics.fmean(vals), statistics.stdev(vals)  # stdev = unbiased
                        chans.append([(v - mu) / (sd + 1e-6) for v in vals])
                    per_b.append([chans[ci][k] for k in range(len(chans[0])) for ci in range(c)])
        tokens.append(per_b)
    return tokens


def test_target_matches_naive_loop():
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 8, 8)
    target = pixel_target(video, 4, 2)
    expected = torch.tensor(_naive_target(video, 4, 2), dtype=torch.float32)
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    assert target.shape == (2, 2 * 2 * 2, 2 * 4 * 4 * 3)


def _naive_loss(pred, target, enc, dec) -> float:
    total, count = 0.0, 0
    for bi in range(enc.shape[0]):
        j = 0  # index into pred: decoder-kept tokens in ascending order
        for n in range(enc.shape[1]):
            kept = bool(enc[bi, n]) if dec is None else not bool(dec[bi, n])
            if not kept:
                continue
            if enc[bi, n]:  # loss only where the encoder did not see the token
                diffs = [(pred[bi, j, d].item() - target[bi, n, d].item()) ** 2 for d in range(target.shape[2])]
                total += sum(diffs) / len(diffs)
                count += 1
            j += 1
    return total / count


@pytest.mark.parametrize("decoder_kind", ["running_cell", "none", "random", "frame"])
def test_loss_matches_naive_loop(decoder_kind):
    g = torch.Generator().manual_seed(1)
    grid = TokenGrid(2, 4, 4)
    enc, dec = make_masks("tube", 0.75, decoder_kind, 0.5, 2, grid, generator=g)
    video = torch.randn(2, 3, 4, 16, 16, generator=g)
    target = pixel_target(video, 4, 2)
    n_keep = int(enc[0].sum()) if dec is None else int((~dec[0]).sum())
    pred = torch.randn(2, n_keep, target.shape[-1], generator=g)
    loss = reconstruction_loss(pred, target, enc, dec)
    assert loss.item() == pytest.approx(_naive_loss(pred, target, enc, dec), rel=1e-5)


def test_loss_counts_only_encoder_hidden_and_decoder_kept():
    g = torch.Generator().manual_seed(2)
    grid = TokenGrid(2, 4, 4)
    enc, dec = make_masks("tube", 0.75, "running_cell", 0.5, 2, grid, generator=g)
    target = pixel_target(torch.randn(2, 3, 4, 16, 16, generator=g), 4, 2)
    kept = ~dec
    labels = target[kept].view(2, -1, target.shape[-1])
    carries = enc[kept].view(2, -1)  # which predicted tokens carry loss
    assert carries.any() and (~carries).any()  # both kinds present, so the test can tell them apart

    perfect = labels.clone()
    assert reconstruction_loss(perfect, target, enc, dec).item() == 0.0
    noisy_visible = perfect.clone()
    noisy_visible[~carries] += 5.0  # errors on encoder-visible kept tokens are ignored
    assert reconstruction_loss(noisy_visible, target, enc, dec).item() == 0.0
    noisy_hidden = perfect.clone()
    noisy_hidden[carries] += 1.0  # error 1 on every value of every loss token -> mean 1 (normalised by count)
    assert reconstruction_loss(noisy_hidden, target, enc, dec).item() == pytest.approx(1.0, rel=1e-6)
    one = perfect.clone()
    b, j = carries.nonzero()[0].tolist()
    one[b, j] += 2.0  # one token off by 2 everywhere: loss = 4 / number of loss tokens
    assert reconstruction_loss(one, target, enc, dec).item() == pytest.approx(4.0 / int(carries.sum()), rel=1e-5)
    assert int(carries.sum()) == int((enc & ~dec).sum())


def test_loss_dtype_and_grad():
    enc, dec = make_masks("tube", 0.75, "running_cell", 0.5, 1, TokenGrid(2, 2, 2))
    target = pixel_target(torch.randn(1, 3, 4, 8, 8), 4, 2)
    pred = torch.zeros(1, 4, target.shape[-1], dtype=torch.bfloat16, requires_grad=True)
    loss = reconstruction_loss(pred, target, enc, dec)
    assert loss.dtype == torch.float32  # computed in float32 even for bf16 predictions
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
