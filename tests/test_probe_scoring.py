"""kNN and linear probes against references computed by hand in numpy; the attentive probe learns a toy set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmae_ds.probe.attentive import AttentiveSettings, attentive_scores, train_attentive
from vmae_ds.probe.scoring import ProbeError, fit_linear, knn_scores, linear_scores


def _features(n: int, d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 1.5
    y = rng.integers(0, c, size=n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def _knn_numpy(xtr, ytr, xva, c, k, t):
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xva / np.linalg.norm(xva, axis=1, keepdims=True)
    out = np.zeros((len(xva), c))
    for i, row in enumerate(b @ a.T):
        for j in np.argsort(-row)[:k]:
            out[i, ytr[j]] += np.exp(row[j] / t)
    return out / out.sum(axis=1, keepdims=True)


def test_knn_equals_numpy_reference():
    xtr, ytr = _features(120, 16, 5, 0)
    xva, _ = _features(40, 16, 5, 1)
    for k, t in ((1, 0.07), (7, 0.07), (20, 0.5), (500, 0.1)):  # k above n_train uses every training feature
        ours = knn_scores(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xva), 5, k=k,
                          temperature=t, chunk=13).numpy()
        ref = _knn_numpy(xtr.astype(np.float64), ytr, xva.astype(np.float64), 5, min(k, 120), t)
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-6)
        assert (ours.argmax(1) == ref.argmax(1)).all()


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_linear_probe_is_the_optimum_a_numpy_reference_finds():
    xtr, ytr = _features(150, 12, 4, 2)
    xva, _ = _features(50, 12, 4, 3)
    wd = 1e-2
    probe = fit_linear(torch.from_numpy(xtr), torch.from_numpy(ytr), 4, weight_decay=wd, dtype=torch.float64)
    # the objective by hand: standardise, mean cross-entropy + wd/2 |W|^2; its gradient is zero at our solution
    mu, sd = xtr.mean(0).astype(np.float64), xtr.astype(np.float64).std(0)
    z = (xtr - mu) / sd
    onehot = np.eye(4)[ytr]
    w, b = probe.weight.numpy(), probe.bias.numpy()
    p = _softmax(z @ w + b)
    grad_w = z.T @ (p - onehot) / len(z) + wd * w
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6
    # and plain gradient descent in numpy, from zero, lands on the same probabilities
    w2, b2 = np.zeros((12, 4)), np.zeros(4)
    for _ in range(20000):
        p2 = _softmax(z @ w2 + b2)
        w2 -= 0.5 * (z.T @ (p2 - onehot) / len(z) + wd * w2)
        b2 -= 0.5 * (p2 - onehot).mean(0)
    ref = _softmax((xva - mu) / sd @ w2 + b2)
    ours = linear_scores(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xva), 4,
                         weight_decay=wd).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_probes_refuse_bad_inputs_in_one_line():
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ProbeError, match=r"labels must be in \[0, 2\)"):
        knn_scores(x, y, x, 2)
    with pytest.raises(ProbeError, match="no training features"):
        linear_scores(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), x, 3)
    with pytest.raises(ProbeError, match="one D"):
        knn_scores(x, y, torch.randn(3, 5), 3)


def test_attentive_probe_learns_a_separable_token_set():
    # the class is only which of 4 directions a few of the 16 tokens point in; the rest is noise of the same
    # size: mean pooling blurs it, attention can pick the tokens out
    g = torch.Generator().manual_seed(0)
    n, tokens, d, c = 192, 16, 32, 4
    dirs = torch.randn(c, d, generator=g)
    y = torch.arange(n) % c
    x = torch.randn(n, tokens, d, generator=g)
    x[:, :3] += 3 * dirs[y][:, None]
    train, val = slice(0, 128), slice(128, n)
    settings = AttentiveSettings(epochs=30, batch_size=32, base_lr=4e-2, warmup_epochs=2)
    probe, history = train_attentive(x[train].half(), y[train], c, settings)
    acc = float((attentive_scores(probe, x[val].half()).argmax(1) == y[val]).float().mean())
    assert history[-1] < 0.5 * history[0]
    assert acc >= 0.9, (acc, history)
    again, _ = train_attentive(x[train].half(), y[train], c, settings)  # its own seed: the same probe again
    assert all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(), again.state_dict().values()))


def test_attentive_probe_on_a_small_set_runs_at_least_min_steps():
    s = AttentiveSettings(epochs=2, batch_size=8, min_steps=12)
    assert s.epochs_for(64) == 2 and s.epochs_for(16) == 6 and s.epochs_for(3) == 12  # 8, 2 and 1 steps an epoch
    x, y = torch.randn(16, 4, 8), torch.arange(16) % 2
    _, history = train_attentive(x, y, 2, s)
    assert len(history) == 6


def test_sample_cap_takes_the_same_share_of_every_shard():
    from vmae_ds.data.finetune import capped_counts

    assert capped_counts([4, 4, 4], None) == [4, 4, 4] and capped_counts([4, 4, 4], 50) == [4, 4, 4]
    assert capped_counts([4, 4, 4, 4, 4, 4], 16) == [3, 3, 3, 3, 2, 2]  # remainders to the earlier shards
    assert capped_counts([10, 5, 1], 8) == [5, 3, 0]
    for counts, cap in (([7, 3, 9, 1], 11), ([100, 1], 2), ([5], 3)):
        got = capped_counts(counts, cap)
        assert sum(got) == cap and all(0 <= g <= c for g, c in zip(got, counts))


def test_probe_section_is_checked_at_start_up(tmp_path):
    from engine_helpers import write_config

    from vmae_ds.config import ConfigError
    from vmae_ds.engine.run_config import load_run_config

    probe = {"train_shards": str(tmp_path / "nope"), "val_shards": str(tmp_path / "nope")}
    with pytest.raises(ConfigError) as e:  # a typo'd probe set costs seconds, not a start-up
        load_run_config(write_config(tmp_path / "a.yaml", probe=probe))
    assert "probe.train_shards" in str(e.value) and "nope" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="probe.kind"):
        load_run_config(write_config(tmp_path / "b.yaml", probe={**probe, "kind": "svm"}))
    with pytest.raises(ConfigError, match="section 'probe' is for pretraining"):
        load_run_config(write_config(tmp_path / "c.yaml", probe=probe, objective="classify", masks=None,
                                     finetune={"num_classes": 4}))
