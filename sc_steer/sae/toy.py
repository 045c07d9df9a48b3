"""Synthetic activations with known ground truth: sparse combinations of more unit directions than
dimensions (superposition). Used by the recovery test and ``bench/toy_recovery.py``."""
from __future__ import annotations

import torch


def make_toy_data(n: int, d: int, n_features: int, active: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = sum_i c_i * u_i`` over ``active`` randomly chosen true directions per sample.

    Returns ``(x [n, d], directions [n_features, d])``; magnitudes are uniform in [0.5, 1.5].
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    coef = 0.5 + torch.rand(n, active, generator=g)
    x = torch.einsum("na,nad->nd", coef, dirs[idx])
    return x, dirs


def mean_max_cosine(true_dirs: torch.Tensor, learned: torch.Tensor) -> float:
    """For each true direction, the best cosine with any learned decoder row; averaged."""
    a = true_dirs / true_dirs.norm(dim=1, keepdim=True)
    b = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((a @ b.T).max(dim=1).values.mean())
