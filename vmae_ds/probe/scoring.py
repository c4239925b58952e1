"""kNN and linear probes on pooled features: pure functions of (train features, labels, val features).

Both return per-class scores (n_val, C) that rank the classes (top-1 / top-5). kNN: cosine similarity to
every training feature, the k nearest vote with weight exp(similarity / T) (the weighting DINO's kNN
evaluation uses). Linear: multinomial logistic regression on standardised features with an L2 penalty on the
weights, solved to convergence by full-batch L-BFGS: no epochs over videos, seconds on cached features, and a
unique optimum (strictly convex), so it is reproducible and checkable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class ProbeError(ValueError):
    """Features or labels a probe cannot use; one line naming what is wrong."""


def _check(train: Tensor, labels: Tensor, val: Tensor, num_classes: int) -> None:
    if train.dim() != 2 or val.dim() != 2 or train.shape[1] != val.shape[1]:
        raise ProbeError(f"features must be (n, D) with one D: train {tuple(train.shape)}, val {tuple(val.shape)}")
    if labels.shape != (train.shape[0],):
        raise ProbeError(f"{tuple(labels.shape)} labels for {train.shape[0]} training features")
    if train.shape[0] == 0:
        raise ProbeError("no training features (every probe training sample was unreadable or unlabelled)")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ProbeError(f"training labels must be in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")


def knn_scores(train: Tensor, labels: Tensor, val: Tensor, num_classes: int, *, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """(n_val, C) temperature-weighted votes of the k most cosine-similar training features (k capped at
    n_train), normalised to sum 1 per row."""
    _check(train, labels, val, num_classes)
    if k < 1 or temperature <= 0:
        raise ProbeError(f"knn needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    bank = F.normalize(train.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for i in range(0, val.shape[0], chunk):  # (chunk, n_train) similarities at a time: bounded memory
        sim = F.normalize(val[i:i + chunk].float(), dim=1) @ bank.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float32, device=sim.device)
        votes.scatter_add_(1, labels.to(sim.device)[idx], (top / temperature).exp())
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


@dataclass
class LinearProbe:
    """softmax((x - mean) / std @ weight + bias): fitted by `fit_linear`."""

    mean: Tensor
    std: Tensor
    weight: Tensor  # (D, C)
    bias: Tensor  # (C,)
    iterations: int
    final_loss: float

    def logits(self, x: Tensor) -> Tensor:
        z = (x.to(self.mean) - self.mean) / self.std
        return z @ self.weight + self.bias

    def scores(self, x: Tensor) -> Tensor:
        return self.logits(x).softmax(dim=1).float()


def fit_linear(train: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 1e-3,
               max_iter: int = 500, dtype: torch.dtype = torch.float32) -> LinearProbe:
    """Minimise mean cross-entropy + weight_decay / 2 x |weight|^2 (bias not penalised) over standardised
    features (train mean and std). The same optimum as scikit-learn's LogisticRegression with
    C = 1 / (n x weight_decay) on the standardised features."""
    _check(train, labels, train, num_classes)
    if weight_decay <= 0:
        raise ProbeError(f"linear probe weight_decay must be > 0 (it makes the optimum unique), got {weight_decay}")
    x = train.to(dtype)
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-6)
    z, y = (x - mean) / std, labels.to(x.device).long()
    w = torch.zeros(x.shape[1], num_classes, dtype=dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=x.device, requires_grad=True)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=tol, tolerance_change=tol * 1e-3)

    def objective() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        final = float(opt.step(objective).detach())
    iters = opt.state[opt._params[0]].get("n_iter", 0)
    return LinearProbe(mean, std, w.detach(), b.detach(), int(iters), final)


def linear_scores(train: Tensor, labels: Tensor, val: Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                  max_iter: int = 500) -> Tensor:
    """(n_val, C) softmax of the fitted linear probe."""
    _check(train, labels, val, num_classes)
    return fit_linear(train, labels, num_classes, weight_decay=weight_decay, max_iter=max_iter).scores(val)
