"""Whole-batch quantities of a training step, whether the batch is in one process or split over ranks.

Every SAE loss here has a batch-wide part: FVU and AuxK are normalised by the batch's variance about
its mean, ReLU's and JumpReLU's terms are means over the batch, BatchTopK keeps the top ``k * batch``
activations of the whole batch. In data-parallel training (``--parallel data``) each rank holds a
slice of the global batch; computing these parts over the global batch makes each rank's loss its
share of the single-process loss, so that the summed gradients equal the single-process gradients.

``WholeBatch`` (its instance ``WHOLE``) is the one-process case and computes exactly what the formulas
say; ``ShardedBatch`` gives the same numbers (up to float rounding) from slices, with a few small
all-reduces. The trainer hands one of them to every loss in ``StepInputs.batch``.
"""
from __future__ import annotations

import torch


class WholeBatch:
    """The batch in hand is the whole batch."""

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the batch's parts."""
        return t

    def mean_rows(self, v: torch.Tensor) -> torch.Tensor:
        """The mean over the batch of per-row values ``v [n]``."""
        return v.mean()

    def centered_energy(self, t: torch.Tensor) -> torch.Tensor:
        """``sum ||t_i - mean(t)||^2`` over the batch (no gradient)."""
        t = t.detach()
        return (t - t.mean(0)).pow(2).sum()

    def keep_top(self, h: torch.Tensor, n_keep: int) -> torch.Tensor:
        """``h`` with all but its ``n_keep`` largest entries zeroed (gradient through the kept ones)."""
        flat = h.reshape(-1)
        vals, idx = flat.topk(min(n_keep, flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, vals).reshape_as(h)

    def cut(self, h: torch.Tensor, n_keep: int) -> torch.Tensor:
        """The ``n_keep``-th largest entry of ``h`` (no gradient)."""
        flat = h.detach().reshape(-1)
        return flat.topk(min(n_keep, flat.numel()), sorted=False).values.min()

    def rows(self, n_local: int) -> int:
        """Rows in the whole batch."""
        return n_local

    def smallest(self, t: torch.Tensor) -> torch.Tensor:
        """The minimum of a 0-d tensor over the batch's parts."""
        return t

    def all_rows(self, v: torch.Tensor) -> torch.Tensor:
        """Per-row values ``v [n_local]`` of every part, in global row order (no gradient)."""
        return v.detach()

    def rows_at(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (global row numbers) of the whole batch's ``t [n, d]``, on every part."""
        return t.detach()[idx.to(t.device)]


class ShardedBatch(WholeBatch):
    """This rank holds ``n_local`` of the global batch's ``n_global`` rows; ``dist`` joins the parts."""

    def __init__(self, dist, n_global: int):
        self.dist, self.n_global = dist, n_global

    def _sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return self.dist.all_reduce_(t.detach().clone(), what)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return self._sum(t, "a sum over the batch")

    def mean_rows(self, v: torch.Tensor) -> torch.Tensor:
        return v.sum() / self.n_global

    def centered_energy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        mean = self._sum(t.sum(0), "the batch mean") / self.n_global
        return self._sum((t - mean).pow(2).sum(), "the batch variance")

    def cut(self, h: torch.Tensor, n_keep: int) -> torch.Tensor:
        """The ``n_keep``-th largest of the union of every rank's own top ``n_keep`` entries: no other
        entry can be among the global top."""
        flat = h.detach().reshape(-1)
        m = min(n_keep, flat.numel())
        cand = torch.full((n_keep,), float("-inf"), dtype=flat.dtype, device=flat.device)
        cand[:m] = flat.topk(m, sorted=False).values
        pooled = torch.cat(self.dist.all_gather(cand, "BatchTopK's global cut"))
        return pooled.topk(min(n_keep, pooled.numel()), sorted=False).values.min()

    def keep_top(self, h: torch.Tensor, n_keep: int) -> torch.Tensor:
        """This rank's entries at or above the global cut (ties at the cut are all kept)."""
        return h * (h >= self.cut(h, n_keep)).to(h.dtype)

    def rows(self, n_local: int) -> int:
        return self.n_global

    def smallest(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_(t.detach().clone(), "the batch minimum", op="min")

    def _bounds(self) -> list[int]:
        return [self.n_global * r // self.dist.world for r in range(self.dist.world + 1)]

    def all_rows(self, v: torch.Tensor) -> torch.Tensor:
        b = self._bounds()   # slices differ by at most one row: pad to the longest for the gather
        size = max(hi - lo for lo, hi in zip(b, b[1:]))
        padded = torch.zeros(size, dtype=v.dtype, device=v.device)
        padded[:len(v)] = v.detach()
        parts = self.dist.all_gather(padded, "the per-row values of the batch")
        return torch.cat([p[:hi - lo] for p, lo, hi in zip(parts, b, b[1:])])

    def rows_at(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds()[self.dist.rank:self.dist.rank + 2]
        idx = idx.to(t.device)
        mine = (idx >= lo) & (idx < hi)
        out = torch.zeros(len(idx), t.shape[1], dtype=t.dtype, device=t.device)
        out[mine] = t.detach()[idx[mine] - lo]
        return self.dist.all_reduce_(out, "the picked rows of the batch")   # each row is held by one rank


WHOLE = WholeBatch()
