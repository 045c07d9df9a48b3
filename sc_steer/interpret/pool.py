"""The candidates an explanation is chosen from: for each unit, the ``POOL`` tokens or pairs with the
largest gain ``c (m - mu)^2 = (S - mu c)^2 / c`` on their own (``S`` the unit's sum over the entry's
positions, ``c`` their count, ``mu`` the unit's mean), among entries seen ``MIN_COUNT`` times on the
explaining half. ``tables`` are ``(TokenTable, first column)`` pairs of the joined [tokens | pairs]
vocabulary; every function returns ``[units, w]`` joined columns, best first, and whether each is a
candidate.
"""
from __future__ import annotations

import torch

from .tokens import TokenTable, best_per_row

MIN_COUNT = 3        # explaining-half occurrences a token or pair needs to enter an explanation
POOL = 64            # candidates per unit the greedy choice picks from (the best on their own)


def gains(table: TokenTable, start: int, stop: int, mu: torch.Tensor) -> torch.Tensor:
    """``[stop - start, cols]`` gains of every column seen ``MIN_COUNT`` times (-1 elsewhere)."""
    cols = torch.arange(table.vocab, device=table.count.device)
    c = table.count.double()
    s = table.block_sums(start, stop, cols)
    gain = (s - mu[start:stop, None] * c).pow(2) / c.clamp_min(1)
    return torch.where(c >= MIN_COUNT, gain, torch.full_like(gain, -1.0))


def dense_pool(tables: list[tuple[TokenTable, int]], start: int, stop: int,
               mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every column's gain, then the best ``POOL``."""
    g = torch.cat([gains(t, start, stop, mu) for t, _ in tables], 1)
    top = g.topk(min(POOL, g.shape[1]), dim=1)
    return top.indices, top.values >= 0


def sparse_pool(tables: list[tuple[TokenTable, int]], start: int, stop: int,
                mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dense_pool`` from the tables' nonzero sums (the same pool up to the order of equal gains).

    Where a unit's sum at a column is zero its gain is ``mu^2 c``: the same order (by count) for every
    unit. So the candidates are each unit's nonzero sums plus the ``2 POOL`` most frequent columns; a
    unit with fewer than ``POOL`` zero sums among those (its best zero-sum columns could lie beyond
    them) is ranked over every column."""
    dev = mu.device
    B, mu_b = stop - start, mu[start:stop]
    w = min(POOL, sum(t.vocab for t, _ in tables))
    parts, full = [], torch.zeros(B, dtype=torch.bool, device=dev)
    for table, shift in tables:
        c = table.count.double()
        valid = c >= MIN_COUNT
        n_valid = int(valid.sum())
        if n_valid == 0:
            continue
        freq = torch.where(valid, c, torch.full_like(c, -1.0)).topk(min(2 * w, n_valid)).indices
        s = table.block_sums(start, stop, freq)                                   # [B, F]
        rows = torch.arange(B, device=dev)[:, None].expand_as(s)
        parts.append((rows.flatten(), (freq + shift).expand(B, -1).flatten(),
                      ((s - mu_b[:, None] * c[freq]).pow(2) / c[freq]).flatten()))
        if len(freq) < n_valid:
            full |= (s != 0).sum(1) > len(freq) - w
        u, col, v = table.block_entries(start, stop)
        in_freq = torch.zeros(table.vocab, dtype=torch.bool, device=dev)
        in_freq[freq] = True
        ok = valid[col] & ~in_freq[col]
        u, col, v = u[ok], col[ok], v[ok]
        parts.append((u, col + shift, (v - mu_b[u] * c[col]).pow(2) / c[col]))
    if parts:
        u, col, g = (torch.cat(x) for x in zip(*parts))
    else:
        u = col = torch.zeros(0, dtype=torch.int64, device=dev)
        g = torch.zeros(0, dtype=torch.float64, device=dev)
    keep = ~full[u]
    u, col, g = u[keep], col[keep], g[keep].double()
    for r in full.nonzero()[:, 0].tolist():          # units ranked over every column
        gr = torch.cat([gains(t, start + r, start + r + 1, mu)[0] for t, _ in tables])
        ok = gr >= 0
        u = torch.cat([u, torch.full((int(ok.sum()),), r, device=dev)])
        col = torch.cat([col, ok.nonzero()[:, 0]])
        g = torch.cat([g, gr[ok]])
    val, idx = best_per_row(u, g, col, B, w, -1.0)
    return idx, val >= 0
