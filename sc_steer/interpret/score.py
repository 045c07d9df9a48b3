"""One interpretability number, computed identically for SAE features and for neurons.

**Top-token concentration**: take a unit's ``n`` highest activations over the corpus (its top
contexts); the score is the share of their activation mass carried by the 5 token ids with the
most mass. 1.0 = the unit's strongest activations all sit on at most 5 token types (a crisp,
token-level reading); ~5/n = every top activation is on a different token.

What it captures: how consistently a unit's strongest firing is about the same few tokens, which
is what the post's "top input tokens" tables show by eye. What it does not capture: units that are
interpretable through context rather than token identity (e.g. "inside a quotation", "end of a
verse"), polysemantic units whose top-5 happen to be unrelated tokens, and anything about weaker
activations. Units with fewer than ``n`` positive activations are left out (score None).
"""
from __future__ import annotations

import math

import torch


def concentration(top_vals: torch.Tensor, top_tokens: torch.Tensor, n_tokens: int = 5) -> float | None:
    """Share of positive top-activation mass on the ``n_tokens`` heaviest token ids (None if not enough)."""
    ok = top_vals > 0
    if not bool(ok.all()):
        return None
    mass: dict[int, float] = {}
    for v, t in zip(top_vals.tolist(), top_tokens.tolist()):
        mass[t] = mass.get(t, 0.0) + v
    heavy = sorted(mass.values(), reverse=True)[:n_tokens]
    return sum(heavy) / sum(mass.values())


def token_entropy(top_vals: torch.Tensor, top_tokens: torch.Tensor) -> float | None:
    """Entropy (bits) of the token ids among the top activations, weighted by activation."""
    if not bool((top_vals > 0).all()):
        return None
    mass: dict[int, float] = {}
    for v, t in zip(top_vals.tolist(), top_tokens.tolist()):
        mass[t] = mass.get(t, 0.0) + v
    total = sum(mass.values())
    return -sum(m / total * math.log2(m / total) for m in mass.values())


def _token_mass(top_vals: torch.Tensor, top_tokens: torch.Tensor) -> torch.Tensor:
    """``[U, n]`` float64: each row's activation mass per distinct token id (zeros pad the unused slots).
    Sorting the ids puts equal ones next to each other, so each run of equal ids is one group."""
    tok, order = top_tokens.sort(dim=1)
    vals = top_vals.double().gather(1, order)
    new_group = torch.ones_like(tok, dtype=torch.bool)
    new_group[:, 1:] = tok[:, 1:] != tok[:, :-1]
    group = new_group.long().cumsum(1) - 1
    return torch.zeros_like(vals).scatter_add_(1, group, vals)


def _none_unless(ok: torch.Tensor, vals: torch.Tensor) -> list[float | None]:
    return [v if o else None for v, o in zip(vals.tolist(), ok.tolist())]


def concentration_many(top_vals: torch.Tensor, top_tokens: torch.Tensor, n_tokens: int = 5) -> list[float | None]:
    """``concentration`` for every row of ``top_vals [U, n]`` / ``top_tokens [U, n]`` at once."""
    mass = _token_mass(top_vals, top_tokens)
    heavy = mass.topk(min(n_tokens, mass.shape[1]), dim=1).values.sum(1)
    return _none_unless((top_vals > 0).all(1), heavy / mass.sum(1))


def token_entropy_many(top_vals: torch.Tensor, top_tokens: torch.Tensor) -> list[float | None]:
    """``token_entropy`` for every row of ``top_vals [U, n]`` / ``top_tokens [U, n]`` at once."""
    mass = _token_mass(top_vals, top_tokens)
    p = mass / mass.sum(1, keepdim=True)
    bits = -torch.where(p > 0, p * p.log2(), torch.zeros_like(p)).sum(1)
    return _none_unless((top_vals > 0).all(1), bits)


def summarize(scores: list[float | None]) -> dict:
    vals = sorted(s for s in scores if s is not None)
    if not vals:
        return {"n": 0}
    q = lambda p: vals[min(len(vals) - 1, int(p * (len(vals) - 1) + 0.5))]  # noqa: E731
    return {"n": len(vals), "mean": sum(vals) / len(vals), "p25": q(0.25), "median": q(0.5), "p75": q(0.75),
            "share_above_0.8": sum(v >= 0.8 for v in vals) / len(vals)}
