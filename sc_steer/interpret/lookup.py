"""The arithmetic of a lookup explanation, on per-entry sums (no activations): choosing its entries
greedily, and the classes its entries split the positions into.

An explanation is a list of entries, each a token or a (previous token, token) pair. Its entries split
the positions into classes: a chosen pair's positions; a chosen token's positions that no chosen pair
of that token covers; the rest. Each class is predicted by its mean on the explaining half (the rest by
the mean of the rest). Everything here works on ``[units, entries]`` tensors of sums and counts.
"""
from __future__ import annotations

import torch

NEG = float("-inf")


def _sq_over(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``s^2 / c``, 0 where ``c`` is 0 (an empty class explains nothing)."""
    return torch.where(c > 0, s.pow(2) / c.clamp_min(1e-300), torch.zeros_like(s))


def parents(is_pair: torch.Tensor, token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[U, M]``: for each pair entry the index of the token entry of its token (-1 where none)."""
    same = (is_pair & valid)[:, :, None] & (~is_pair & valid)[:, None, :] & (token[:, :, None] == token[:, None, :])
    return torch.where(same.any(2), same.float().argmax(2), torch.full_like(token, -1))


def greedy(s: torch.Tensor, c: torch.Tensor, is_pair: torch.Tensor, token: torch.Tensor, valid: torch.Tensor,
           total_s: torch.Tensor, total_c: float, n: int) -> torch.Tensor:
    """The order in which candidates join an explanation: at each step the one that removes the most
    squared error on the explaining half given those before it (``s``, ``c`` ``[U, M]``: each candidate's
    sum and count there; ``total_s [U]``, ``total_c``: the unit's sum and the position count). Returns
    ``[U, n]`` candidate indices (-1 once no candidate is left)."""
    U, M = s.shape
    rows = torch.arange(U, device=s.device)
    par = parents(is_pair, token, valid)
    has_par = par >= 0
    par_c = par.clamp_min(0)
    cls_s, cls_c = s.clone(), c.clone()                 # token candidates' classes: minus chosen pairs
    rest_s = total_s.clone()
    rest_c = torch.full_like(total_s, float(total_c))
    chosen = torch.zeros_like(valid)
    order = torch.full((U, n), -1, dtype=torch.long, device=s.device)
    for step in range(n):
        under = is_pair & has_par & chosen.gather(1, par_c)   # a pair whose token is chosen leaves its class
        base_s = torch.where(under, cls_s.gather(1, par_c), rest_s[:, None])
        base_c = torch.where(under, cls_c.gather(1, par_c), rest_c[:, None])
        x_s, x_c = torch.where(is_pair, s, cls_s), torch.where(is_pair, c, cls_c)
        gain = _sq_over(x_s, x_c) + _sq_over(base_s - x_s, base_c - x_c) - _sq_over(base_s, base_c)
        gain = gain.masked_fill(~valid | chosen | (x_c <= 0), NEG)
        best = gain.max(1)
        ok = best.values > NEG
        pick = best.indices
        order[:, step] = torch.where(ok, pick, torch.full_like(pick, -1))
        p_pair, p_under = is_pair[rows, pick] & ok, under[rows, pick] & ok
        p_tok = ~is_pair[rows, pick] & ok
        # the rest gives up a chosen token's class, or a chosen pair not under a chosen token
        rest_s -= torch.where(p_tok, cls_s[rows, pick], torch.where(p_pair & ~p_under, s[rows, pick], 0.0))
        rest_c -= torch.where(p_tok, cls_c[rows, pick], torch.where(p_pair & ~p_under, c[rows, pick], 0.0))
        # a chosen pair leaves its token's class (chosen or not)
        q = par_c[rows, pick]
        shrink = p_pair & has_par[rows, pick]
        cls_s[rows, q] -= torch.where(shrink, s[rows, pick], 0.0)
        cls_c[rows, q] -= torch.where(shrink, c[rows, pick], 0.0)
        chosen[rows, pick] |= ok
    return order


def classes(x: torch.Tensor, is_pair: torch.Tensor, token: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Per entry: how much of quantity ``x`` (an entry's own sum or count) its class holds when the
    entries ``inside`` make the explanation: a pair its own; a token its own minus its pairs inside."""
    pair, tok = inside & is_pair, inside & ~is_pair
    under = pair[:, :, None] & tok[:, None, :] & (token[:, :, None] == token[:, None, :])   # [U, i, j]
    minus = torch.einsum("uij,ui->uj", under.to(x.dtype), x)
    return torch.where(pair, x, torch.where(tok, x - minus, torch.zeros_like(x)))
