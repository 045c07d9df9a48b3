"""Streaming per-unit statistics over a corpus: density, max, histogram, per-token means, top contexts.

A "unit" is anything with one activation per token: an SAE feature, a residual dimension, an MLP
neuron. Chunks of whole rows arrive one at a time; nothing keeps all activations, and the top
contexts of every unit are merged chunk by chunk (top-n of the union of the old and new top-n).
"""
from __future__ import annotations

import torch

from .tokens import (
    DENSE_TOKEN_TABLE_LIMIT,
    Nonzeros,
    SummedTables,
    TokenTable,
    best_per_row,
)

HIST_EDGES = torch.linspace(-3, 3, 37)  # log10 of positive activations, clipped into the end bins
MEANS_BLOCK = 1 << 23                   # float64 per-token means held at once by top_tokens_block (64 MiB)


class UnitStats:
    """Accumulate statistics for ``n_units`` units over token chunks (see ``update``)."""

    def __init__(self, n_units: int, vocab: int, top_n: int = 20, window: int = 8,
                 device: str | torch.device = "cpu", dense_token_limit: int = DENSE_TOKEN_TABLE_LIMIT,
                 token_sums: TokenTable | SummedTables | None = None, windows: int | None = None):
        """Accumulators live on ``device`` (the model's: per-token work stays on the GPU); ``cpu()``
        moves them to the host for the per-unit read-out. ``token_sums``: per-token sums some other
        accumulator keeps over the same tokens (the explanation tables), read instead of a table here.
        ``windows``: how many of the top activations keep their context window (all ``top_n`` unless
        told; the records show the first ten)."""
        self.n_units, self.vocab, self.top_n, self.window = n_units, vocab, top_n, window
        self.n_windows = top_n if windows is None else min(windows, top_n)
        self.device = torch.device(device)
        self.n_tokens = 0
        self.fires = torch.zeros(n_units, dtype=torch.int64)
        self.act_sum = torch.zeros(n_units, dtype=torch.float64)
        self.max = torch.full((n_units,), float("-inf"))
        self.hist = torch.zeros(n_units, len(HIST_EDGES) - 1, dtype=torch.int64)
        self.own_tokens = token_sums is None
        self.tokens = TokenTable(n_units, vocab, device, dense_token_limit) if token_sums is None else token_sums
        w = 2 * window + 1
        self.top_val = torch.full((n_units, top_n), float("-inf"))
        self.top_idx = torch.full((n_units, top_n), -1, dtype=torch.int64)       # global token index
        self.top_win_idx = torch.full((n_units, self.n_windows, w), -1, dtype=torch.int64)  # -1: outside the row
        self.top_win_act = torch.zeros(n_units, self.n_windows, w)
        if self.device.type != "cpu":
            self._move(self.device)

    def _move(self, device: torch.device) -> None:
        for name, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, name, v.to(device))
        self.tokens.to(device)
        self.device = torch.device(device)

    @property
    def token_count(self) -> torch.Tensor:
        return self.tokens.count

    def cpu(self) -> "UnitStats":
        """Finish on the host: the read-out is one small lookup per unit."""
        self._move(torch.device("cpu"))
        return self

    def renumber(self, where: torch.Tensor) -> None:
        """Token indices ``i`` of the top lists become ``where[i]`` (-1 stays -1): the positions as read
        become positions in the text, for a pass that read the text in another order."""
        for name in ("top_idx", "top_win_idx"):
            t = getattr(self, name)
            setattr(self, name, torch.where(t >= 0, where.to(t.device)[t.clamp_min(0)], t))

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, row: torch.Tensor, nz: Nonzeros | None = None) -> None:
        """``acts [T, U]`` for ``T`` consecutive stored tokens made of whole rows; ``row [T]`` their row ids;
        ``nz``: the batch's nonzeros (``Nonzeros.of``), when it is sparse enough to be read by them."""
        acts = acts.to(self.device).float()
        tokens = tokens.to(self.device).long()
        row = row.to(self.device)
        t = len(tokens)
        offset = self.n_tokens
        if nz is None:
            pos = acts > 0
            self.fires += pos.sum(0)
            self.act_sum += torch.where(pos, acts, 0).sum(0).double()
            self.max = torch.maximum(self.max, acts.max(0).values)
            nz_t, nz_u = pos.nonzero(as_tuple=True)
            vals = acts[nz_t, nz_u]
        else:
            on = nz.v > 0
            nz_u, vals = nz.u[on], nz.v[on]
            self.fires += torch.bincount(nz_u, minlength=self.n_units)
            self.act_sum += torch.zeros_like(self.act_sum).index_add_(0, nz_u, vals.double())
            self.max = torch.maximum(self.max, nz.extreme("amax"))
        if len(vals):
            b = torch.bucketize(vals.log10(), HIST_EDGES[1:-1].to(vals.device))
            self.hist.view(-1).index_add_(0, nz_u * self.hist.shape[1] + b, torch.ones_like(b))
        if self.own_tokens:
            self.tokens.add(acts, tokens, nz)
        if nz is not None and t and bool(self.top_val[:, -1].min() >= 0) and not bool((nz.v < 0).any()):
            self._merge_top_sparse(acts, row, offset, nz)
        else:
            self._merge_top(acts, row, offset)
        self.n_tokens += t

    def _merge_top(self, acts: torch.Tensor, row: torch.Tensor, offset: int) -> None:
        """Merge the chunk's best activations into every unit's top list. On the CPU only the units with an
        activation above their current n-th best take part (after the first chunks, a few of them); on
        other devices all do (no host sync)."""
        units = None
        if acts.device.type == "cpu":
            units = (acts > self.top_val[:, -1]).any(0).nonzero().squeeze(1)
            if len(units) == 0:
                return
            if len(units) == acts.shape[1]:
                units = None
            else:
                acts = acts.index_select(1, units)
        old = [x if units is None else x[units] for x in (self.top_val, self.top_idx, self.top_win_idx,
                                                          self.top_win_act)]
        new = self._merged(acts, row, offset, *old)
        self._put(units, new)

    def _put(self, units: torch.Tensor | None, new) -> None:
        for name, value in zip(("top_val", "top_idx", "top_win_idx", "top_win_act"), new):
            if units is None:
                setattr(self, name, value)
            else:
                getattr(self, name)[units] = value

    def _merge_top_sparse(self, acts: torch.Tensor, row: torch.Tensor, offset: int, nz: Nonzeros) -> None:
        """``_merge_top`` for a sparse, non-negative chunk once every list is full of values >= 0: then a
        zero never enters a list (an old entry keeps its place before an equal newcomer), so the
        candidates are the nonzeros above each unit's n-th best, found from ``nz`` without reading the
        T x U batch (its windows are still read from ``acts``)."""
        better = nz.v > self.top_val[nz.u, -1]
        u, t, v = nz.u[better], nz.t[better], nz.v[better]
        if len(u) == 0:
            return
        units, which = torch.unique(u, return_inverse=True)
        n = min(self.top_n, acts.shape[0], int(torch.bincount(which).max()))
        cand = best_per_row(which, v, t, len(units), n, float("-inf"))
        old = [x[units] for x in (self.top_val, self.top_idx, self.top_win_idx, self.top_win_act)]
        self._put(units, self._merged(acts, row, offset, *old, cand=cand, units=units))

    def _merged(self, acts, row, offset, top_val, top_idx, top_win_idx, top_win_act, cand=None, units=None):
        """The merged top lists. Sorting is stable with the old entries first, so an entry keeps its place
        before equal newcomers, and the first ``n_windows`` entries always come from entries that have
        their windows: the old list's first ``n_windows`` and the chunk's best ``n_windows``. ``cand``:
        the chunk's candidates ``([U, n] values best first, [U, n] positions)`` when already chosen, for
        the columns ``units`` of ``acts``."""
        t = acts.shape[0]
        if cand is None:
            n = min(self.top_n, t)
            cand_val, cand_t = acts.topk(n, dim=0)            # [n, U], best first
            cand_val, cand_t = cand_val.T, cand_t.T           # [U, n]
        else:
            cand_val, cand_t = cand
            n = cand_val.shape[1]
        u = cand_val.shape[0]
        all_val = torch.cat([top_val, cand_val], 1)
        keep = torch.sort(all_val, dim=1, descending=True, stable=True).indices[:, :self.top_n]
        new_val, new_idx = all_val.gather(1, keep), torch.cat([top_idx, cand_t + offset], 1).gather(1, keep)
        # windows of the chunk's best n_windows candidates, clamped to each candidate's own row
        nw = min(self.n_windows, n)
        ct = cand_t[:, :nw]
        starts = torch.searchsorted(row, row, side="left")
        ends = torch.searchsorted(row, row, side="right")
        offs = torch.arange(-self.window, self.window + 1, device=acts.device)
        j = ct[..., None] + offs                              # [U, nw, w]
        valid = (j >= starts[ct][..., None]) & (j < ends[ct][..., None])
        jc = j.clamp(0, t - 1)
        if units is None:
            win_act = acts.T.gather(1, jc.reshape(u, -1)).reshape(u, nw, -1) * valid
        else:
            win_act = acts[jc, units[:, None, None]] * valid
        win_idx = torch.where(valid, jc + offset, torch.full_like(jc, -1))
        # where the new list's first n_windows came from, as positions in [old windows | new windows]
        head = keep[:, :self.n_windows]
        from_old = head < self.top_n
        src = torch.where(from_old, head, head - self.top_n + self.n_windows)
        k3 = src[..., None].expand(-1, -1, offs.numel())
        return (new_val, new_idx, torch.cat([top_win_idx, win_idx], 1).gather(1, k3),
                torch.cat([top_win_act, win_act], 1).gather(1, k3))

    # -- results ---------------------------------------------------------------------------------
    def density(self) -> torch.Tensor:
        return self.fires.double() / max(1, self.n_tokens)

    def token_means(self, unit: int, min_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, mean activation over all occurrences) for tokens seen >= min_count times."""
        sums = self.tokens.unit_sums(unit)
        ok = self.token_count >= min_count
        ids = ok.nonzero(as_tuple=True)[0]
        return ids, sums[ids] / self.token_count[ids]

    def top_tokens(self, unit: int, k: int = 10, min_count: int = 5) -> list[tuple[int, float, int]]:
        """The post's table: tokens with the highest mean activation (>= min_count occurrences)."""
        ids, means = self.token_means(unit, min_count)
        if len(ids) == 0:
            return []
        order = means.argsort(descending=True)[:k]
        return [(int(ids[i]), float(means[i]), int(self.token_count[ids[i]])) for i in order if means[i] > 0]

    def top_tokens_block(self, start: int, stop: int, k: int = 10,
                         min_count: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``top_tokens`` of units ``start:stop`` at once: (ids, means, counts), each ``[units, k']`` best first,
        ``k' = min(k, qualifying tokens)``. Means <= 0 are still in; the caller drops them. The means are
        built a block of units at a time, so memory stays bounded for large vocabularies."""
        ids = (self.token_count >= min_count).nonzero(as_tuple=True)[0]
        counts = self.token_count[ids]
        k = min(k, len(ids))
        step = max(1, MEANS_BLOCK // max(1, len(ids)))
        best = [(self.tokens.block_sums(a, min(stop, a + step), ids) / counts).topk(k, dim=1)
                for a in range(start, stop, step)]
        if not best:
            empty = torch.zeros(0, k, dtype=torch.int64, device=ids.device)
            return empty, empty.double(), empty
        pick = torch.cat([b.indices for b in best])
        return ids[pick], torch.cat([b.values for b in best]), counts[pick]
