"""Per-unit activation sums by token id: the table behind "top input tokens" and the simulation score.

Dense ``[units, vocab]`` while that is small; otherwise sparse: sorted keys ``unit * vocab + token`` with
their sums (only nonzero activations are added, negative ones too: residual dimensions and neurons are
signed). Either way every sum is exact over the tokens added.
"""
from __future__ import annotations

import torch

DENSE_TOKEN_TABLE_LIMIT = 64_000_000    # units x vocab entries above which the table is kept sparse
MERGE_EVERY = 8_000_000                 # sparse entries buffered before they are merged


SPARSE_DENSITY = 0.05                   # share of nonzero activations below which a batch is read by its nonzeros


class Nonzeros:
    """The nonzero entries ``(t, u, v)`` of a ``[T, U]`` activation batch. SAE features are mostly zero (a
    TopK SAE with 16,384 latents and k = 32 holds 0.2% nonzeros), so every per-unit sum, count and extreme
    is read from these entries, zeros counted in closed form, at the cost of the active entries instead of
    T x U. ``of`` returns None for a batch too dense for it (neurons, residual dimensions)."""

    def __init__(self, t: torch.Tensor, u: torch.Tensor, v: torch.Tensor, shape: tuple[int, int]):
        self.t, self.u, self.v, self.shape = t, u, v, shape

    @classmethod
    def of(cls, acts: torch.Tensor) -> Nonzeros | None:
        t, u = (acts != 0).nonzero(as_tuple=True)
        if len(t) > SPARSE_DENSITY * acts.numel():
            return None
        return cls(t, u, acts[t, u], tuple(acts.shape))

    def count(self) -> torch.Tensor:
        """``[U]`` nonzero entries per unit."""
        return torch.bincount(self.u, minlength=self.shape[1])

    def extreme(self, kind: str) -> torch.Tensor:
        """``[U]`` column max (``"amax"``) or min (``"amin"``) of the dense batch, zeros included where a
        unit has any."""
        T, U = self.shape
        has_zero = self.count() < T
        start = torch.where(has_zero, 0.0, float("-inf") if kind == "amax" else float("inf"))
        return start.to(self.v.dtype).scatter_reduce_(0, self.u, self.v, kind)


def best_per_row(rows: torch.Tensor, values: torch.Tensor, payload: torch.Tensor, n_rows: int, width: int,
                 pad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged entries ``(rows, values, payload)`` as ``[n_rows, width]`` matrices: each row's largest
    values, best first (``pad`` past its entries; equal values keep their order), and their payloads
    (0 there)."""
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]                     # by row, best first
    rows, values, payload = rows[order], values[order], payload[order]
    counts = torch.bincount(rows, minlength=n_rows)
    slot = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                 counts)
    take = slot < width
    val = torch.full((n_rows, width), pad, dtype=values.dtype, device=values.device)
    out = torch.zeros((n_rows, width), dtype=payload.dtype, device=payload.device)
    val[rows[take], slot[take]] = values[take]
    out[rows[take], slot[take]] = payload[take]
    return val, out


class TokenTable:
    def __init__(self, n_units: int, vocab: int, device: str | torch.device = "cpu",
                 dense_limit: int = DENSE_TOKEN_TABLE_LIMIT):
        self.n_units, self.vocab, self.device = n_units, vocab, torch.device(device)
        self.count = torch.zeros(vocab, dtype=torch.int64, device=self.device)
        self.dense = n_units * vocab <= dense_limit
        # dense: token-major while chunks are added (whole contiguous rows: index_add_ along dim 0 ran 27x
        # faster on the CPU than along a unit-major table's dim 1), unit-major once read (``sums``)
        self._table = torch.zeros(vocab, n_units, device=self.device) if self.dense else None
        self._unit_major = False
        self._keys: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []
        self._unit_starts: list[int] | None = None

    def _layout(self, unit_major: bool) -> torch.Tensor:
        """The dense table stored unit-major ``[units, vocab]`` or token-major ``[vocab, units]`` (one
        transposed copy when it changes)."""
        if self._unit_major != unit_major:
            self._table = self._table.T.contiguous()
            self._unit_major = unit_major
        return self._table

    @property
    def sums(self) -> torch.Tensor:
        """The dense table, ``[units, vocab]``."""
        return self._layout(unit_major=True)

    def add(self, acts: torch.Tensor, tokens: torch.Tensor, nz: Nonzeros | None = None) -> None:
        """``acts [T, U]`` (float) at ``tokens [T]`` (long), both on the table's device; ``nz``: the batch's
        nonzeros when already found (``acts`` is then not read)."""
        self.count += torch.bincount(tokens, minlength=self.vocab)
        if self.dense:
            if nz is None:
                self._layout(unit_major=False).index_add_(0, tokens, acts)
            else:
                self._layout(unit_major=False).index_put_((tokens[nz.t], nz.u), nz.v, accumulate=True)
            return
        t, u, v = (nz.t, nz.u, nz.v) if nz is not None else (*(acts != 0).nonzero(as_tuple=True), None)
        self._keys.append(u * self.vocab + tokens[t])
        self._vals.append((acts[t, u] if v is None else v).double())
        self._unit_starts = None
        if sum(len(k) for k in self._keys) > MERGE_EVERY:
            self.merge()

    def merge(self) -> None:
        """Merge the buffered sparse entries into one sorted table (a no-op when already merged)."""
        if self.dense or not self._keys or (len(self._keys) == 1 and self._unit_starts is not None):
            return
        keys, inv = torch.cat(self._keys).unique(return_inverse=True)   # sorted
        vals = torch.zeros(len(keys), dtype=torch.float64, device=keys.device).index_add_(0, inv, torch.cat(self._vals))
        self._keys, self._vals = [keys], [vals]
        bounds = torch.arange(self.n_units + 1, device=keys.device) * self.vocab
        self._unit_starts = torch.searchsorted(keys, bounds).tolist()   # unit u's entries: one slice

    def to(self, device: str | torch.device) -> TokenTable:
        self.merge()
        self.device = torch.device(device)
        self.count = self.count.to(self.device)
        if self.dense:
            self._table = self._table.to(self.device)
        else:
            self._keys = [k.to(self.device) for k in self._keys]
            self._vals = [v.to(self.device) for v in self._vals]
        return self

    def unit_sums(self, unit: int) -> torch.Tensor:
        """``[vocab]`` float64: the sum of ``unit``'s activations at each token id."""
        if self.dense:
            return self.sums[unit].double()
        self.merge()
        out = torch.zeros(self.vocab, dtype=torch.float64, device=self.device)
        if self._keys:
            a, b = self._unit_starts[unit], self._unit_starts[unit + 1]
            out[self._keys[0][a:b] % self.vocab] = self._vals[0][a:b]
        return out

    def block_sums(self, start: int, stop: int, cols: torch.Tensor) -> torch.Tensor:
        """``[stop - start, len(cols)]`` float64: ``unit_sums`` of units ``start:stop`` at token ids ``cols``,
        for the read-out of many units at once (a sparse table fills it from one slice of its sorted keys)."""
        if self.dense:
            return self.sums[start:stop, cols].double()
        self.merge()
        out = torch.zeros(stop - start, len(cols), dtype=torch.float64, device=self.device)
        if self._keys:
            a, b = self._unit_starts[start], self._unit_starts[stop]
            keys = self._keys[0][a:b]
            col = torch.full((self.vocab,), -1, dtype=torch.int64, device=self.device)
            col[cols] = torch.arange(len(cols), device=self.device)
            c = col[keys % self.vocab]
            ok = c >= 0
            out[keys[ok] // self.vocab - start, c[ok]] = self._vals[0][a:b][ok]
        return out

    def block_entries(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit - ``start``, token, float64 sum) of every nonzero sum of units ``start:stop``."""
        if self.dense:
            blk = self.sums[start:stop]
            u, t = blk.nonzero(as_tuple=True)
            return u, t, blk[u, t].double()
        self.merge()
        if not self._keys:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty, empty.double()
        a, b = self._unit_starts[start], self._unit_starts[stop]
        keys = self._keys[0][a:b]
        return keys // self.vocab - start, keys % self.vocab, self._vals[0][a:b]

    def lookup(self, units: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """float64 sums at the (unit, token) pairs ``units[i], cols[i]`` (any shape, same shape out)."""
        if self.dense:
            return self.sums[units, cols].double()
        self.merge()
        if not self._keys:
            return torch.zeros(units.shape, dtype=torch.float64, device=self.device)
        keys, vals = self._keys[0], self._vals[0]
        want = units * self.vocab + cols
        pos = torch.searchsorted(keys, want).clamp_max(len(keys) - 1)
        return torch.where(keys[pos] == want, vals[pos], torch.zeros((), dtype=torch.float64, device=keys.device))

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every nonzero sum as (unit, token, value) in ascending key order (float64 values)."""
        if self.dense:
            u, t = self.sums.nonzero(as_tuple=True)
            return u, t, self.sums[u, t].double()
        self.merge()
        if not self._keys:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty, empty.double()
        keys = self._keys[0]
        return keys // self.vocab, keys % self.vocab, self._vals[0]


class SummedTables:
    """Two tables read as one (their sums and counts added), for reading both halves of a split corpus
    without a third table. Read-only: ``add`` goes to the tables themselves."""

    def __init__(self, a: TokenTable, b: TokenTable):
        self.a, self.b = a, b
        self.n_units, self.vocab = a.n_units, a.vocab

    @property
    def count(self) -> torch.Tensor:
        return self.a.count + self.b.count

    @property
    def device(self) -> torch.device:
        return self.a.device

    def to(self, device: str | torch.device) -> SummedTables:
        self.a.to(device)
        self.b.to(device)
        return self

    def unit_sums(self, unit: int) -> torch.Tensor:
        return self.a.unit_sums(unit) + self.b.unit_sums(unit)

    def block_sums(self, start: int, stop: int, cols: torch.Tensor) -> torch.Tensor:
        return self.a.block_sums(start, stop, cols) + self.b.block_sums(start, stop, cols)
