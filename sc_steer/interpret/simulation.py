"""The simulation score: how well a unit's activations are predicted from its explanation alone.

In the spirit of Bills et al. (2023, "Language models can explain neurons in language models"), with
a table in place of the language model. Text rows alternate between two halves: even rows explain,
odd rows are held out. A unit's **explanation** is its mean activation per token id on the explaining
half (a token never seen there is predicted as the unit's mean over that half). The **simulation**
predicts every activation of the held-out half from the token alone, and the **score** is the Pearson
correlation between predicted and true activations over the held-out positions: 1 = the unit is a
function of the current token, 0 = the token says nothing about it. Computed identically for SAE
features, residual dimensions and MLP neurons.

What it misses: units that depend on context beyond the current token score low even if a person
could describe them; it rewards token-level units. Units that never vary on the held-out half have no
score (None).

Everything reduces to sums over token ids, so it streams (no activation is kept): with ``E``/``H`` the
per-(unit, token) sums on the two halves and ``c_E``/``c_H`` the token counts, the prediction for token
t is ``E[t] / c_E[t]`` and ``sum pred * true = sum_t pred[t] * H[t]``, ``sum pred = sum_t pred[t] c_H[t]``.
"""
from __future__ import annotations

import math

import torch

from .tokens import DENSE_TOKEN_TABLE_LIMIT, TokenTable


class Simulation:
    def __init__(self, n_units: int, vocab: int, device: str | torch.device = "cpu",
                 dense_limit: int = DENSE_TOKEN_TABLE_LIMIT):
        self.n_units, self.vocab = n_units, vocab
        self.explain = TokenTable(n_units, vocab, device, dense_limit)
        self.held = TokenTable(n_units, vocab, device, dense_limit)
        self.held_sq = torch.zeros(n_units, dtype=torch.float64, device=device)

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, row: torch.Tensor) -> None:
        """``acts [T, U]``, ``tokens [T]``, ``row [T]`` (global row ids: their parity picks the half)."""
        acts = acts.to(self.held_sq.device).float()
        tokens, row = tokens.to(acts.device).long(), row.to(acts.device)
        held = row % 2 == 1
        self.explain.add(acts[~held], tokens[~held])
        self.held.add(acts[held], tokens[held])
        self.held_sq += acts[held].double().pow(2).sum(0)

    def scores(self) -> torch.Tensor:
        """``[U]`` float64 Pearson correlations (NaN where a unit or its prediction does not vary)."""
        U, V = self.n_units, self.vocab
        c_e, c_h = self.explain.count.double(), self.held.count.double()
        n = float(c_h.sum())
        dev = c_e.device
        eu, et, ev = self.explain.entries()
        hu, ht, hv = self.held.entries()
        mean = torch.zeros(U, dtype=torch.float64, device=dev).index_add_(0, eu, ev) / max(float(c_e.sum()), 1.0)
        unseen = c_e == 0
        n_unseen = float(c_h[unseen].sum())
        pred_e = ev / c_e[et].clamp_min(1)                       # predictions at (unit, token) entries of E
        zero = lambda: torch.zeros(U, dtype=torch.float64, device=dev)  # noqa: E731
        s_p = zero().index_add_(0, eu, pred_e * c_h[et]) + mean * n_unseen
        s_pp = zero().index_add_(0, eu, pred_e.pow(2) * c_h[et]) + mean.pow(2) * n_unseen
        s_t = zero().index_add_(0, hu, hv)
        # sum of pred * true: tokens seen in the explaining half (matching keys), then unseen tokens
        e_keys, h_keys = eu * V + et, hu * V + ht
        pos = torch.searchsorted(e_keys, h_keys).clamp_max(max(len(e_keys) - 1, 0))
        match = (e_keys[pos] == h_keys) if len(e_keys) else torch.zeros_like(h_keys, dtype=torch.bool)
        s_pt = zero().index_add_(0, hu[match], pred_e[pos[match]] * hv[match])
        off = unseen[ht]
        s_pt += zero().index_add_(0, hu[off], hv[off]) * mean
        cov = n * s_pt - s_p * s_t
        var_p = n * s_pp - s_p.pow(2)
        var_t = n * self.held_sq - s_t.pow(2)
        ok = (var_p > 1e-12 * n * s_pp.abs().clamp_min(1e-30)) & (var_t > 1e-12 * n * self.held_sq.clamp_min(1e-30))
        out = torch.full((U,), float("nan"), dtype=torch.float64, device=dev)
        out[ok] = cov[ok] / (var_p[ok] * var_t[ok]).sqrt()
        return out.cpu()


def mean_with_ci(scores: list[float | None], z: float = 1.96) -> dict:
    """Mean over units with a normal-approximation 95% confidence interval, and the median."""
    vals = sorted(s for s in scores if s is not None and not math.isnan(s))
    if not vals:
        return {"n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1))
    half = z * sd / math.sqrt(len(vals))
    return {"n": len(vals), "mean": m, "ci95": [m - half, m + half], "median": vals[len(vals) // 2]}
