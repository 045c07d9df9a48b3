"""Synthetic activations with known ground truth: sparse combinations of more unit directions than
dimensions (superposition). Used by the recovery tests and ``bench/toy_recovery.py``.

Two families:

* ``make_toy_data``: exactly ``active`` directions per sample, each equally likely (the easy case);
* ``make_heavy_tailed_data``: direction i fires with probability proportional to ``decay**i`` (a few
  fire often, most rarely, as SAE features of real models do), optionally in correlated groups.
"""
from __future__ import annotations

import torch

# The data's random stream is seeded apart from the SAE's: an SAE seeded s draws its initial decoder
# as torch.randn(d_sae, d_in) from seed s, which is exactly the directions of data seeded s at a 1x
# dictionary, so a shared seed would start the SAE at the answer.
DATA_SEED_OFFSET = 7_919_000


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(DATA_SEED_OFFSET + seed)


def _unit_directions(n_features: int, d: int, g: torch.Generator) -> torch.Tensor:
    dirs = torch.randn(n_features, d, generator=g)
    return dirs / dirs.norm(dim=1, keepdim=True)


def make_toy_data(n: int, d: int, n_features: int, active: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = sum_i c_i * u_i`` over ``active`` randomly chosen true directions per sample.

    Returns ``(x [n, d], directions [n_features, d])``; magnitudes are uniform in [0.5, 1.5].
    """
    g = _generator(seed)
    dirs = _unit_directions(n_features, d, g)
    idx = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    coef = 0.5 + torch.rand(n, active, generator=g)
    x = torch.einsum("na,nad->nd", coef, dirs[idx])
    return x, dirs


def firing_probabilities(n_features: int, mean_active: float, decay: float) -> torch.Tensor:
    """``p_i = c * decay**i`` with ``c`` chosen so that ``sum_i p_i = mean_active`` (an error where the
    most frequent would need a probability above 1)."""
    w = decay ** torch.arange(n_features, dtype=torch.float64)
    p = w * (mean_active / w.sum())
    if float(p.max()) > 1:
        raise ValueError(f"mean_active {mean_active} with decay {decay} needs a firing probability above 1")
    return p


def heavy_tailed_codes(n: int, p: torch.Tensor, g: torch.Generator, correlation: float = 0.0,
                       group: int = 4) -> torch.Tensor:
    """``[n, len(p)]`` coefficients: entry i nonzero with probability ``p[i]``, then uniform in [0, 1].

    ``correlation > 0`` couples consecutive groups of ``group`` entries through a shared Gaussian
    factor (a Gaussian copula: each entry keeps its firing probability, a group fires together more
    often)."""
    m = len(p)
    if correlation > 0:
        cut = torch.distributions.Normal(0.0, 1.0).icdf(1 - p.float()).clamp(-8, 8)
        shared = torch.randn(n, (m + group - 1) // group, generator=g).repeat_interleave(group, dim=1)[:, :m]
        fires = correlation ** 0.5 * shared + (1 - correlation) ** 0.5 * torch.randn(n, m, generator=g) > cut
    else:
        fires = torch.rand(n, m, generator=g, dtype=torch.float64) < p
    return torch.rand(n, m, generator=g) * fires


def make_heavy_tailed_data(n: int, d: int, n_features: int, mean_active: float, decay: float, seed: int = 0,
                           correlation: float = 0.0, group: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = codes @ directions`` with ``heavy_tailed_codes`` at ``firing_probabilities``, the
    probabilities shuffled over the directions so that frequency is not tied to index.

    Returns ``(x [n, d], directions [n_features, d])``.
    """
    g = _generator(seed)
    dirs = _unit_directions(n_features, d, g)
    p = firing_probabilities(n_features, mean_active, decay)[torch.randperm(n_features, generator=g)]
    return heavy_tailed_codes(n, p, g, correlation, group) @ dirs, dirs


def mean_max_cosine(true_dirs: torch.Tensor, learned: torch.Tensor) -> float:
    """For each true direction, the best cosine with any learned decoder row; averaged."""
    return float(max_cosines(true_dirs, learned).mean())


def max_cosines(true_dirs: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each true direction, the best cosine with any learned decoder row."""
    a = true_dirs / true_dirs.norm(dim=1, keepdim=True)
    b = learned.to(a) / learned.to(a).norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).max(dim=1).values
