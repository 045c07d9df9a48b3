"""Explanation scores: how well a unit's activations on held-out text follow from a short explanation
a person could read, as a function of its length; and that explanation's sensitivity and specificity.

In the spirit of Bills et al. (2023), with a lookup in place of a language model. Text rows alternate
between two halves: even rows explain, odd rows are held out (the explaining half is read first).

**Explanation of length K** (token variant): K token ids, chosen greedily: each the one that removes the
most squared error on the explaining half given those before it (``lookup.greedy``; candidates: the
``POOL`` tokens with the largest gain ``c_t (m_t - mu)^2`` on their own, ``c_t`` the token's count, ``m_t``
the unit's mean on it, ``mu`` its mean, among tokens seen at least ``MIN_COUNT`` times). Signed units
work alike: a token can explain a unit by pushing it down. Explanations are nested: the first K
entries of length 20 are the explanation of length K. **Context variant**: the candidates are tokens
and (previous token, token) pairs (the ``N_PAIRS`` most frequent pairs seen at least ``MIN_COUNT``
times on the explaining half).

**Prediction** on a held-out position (previous token p, token t): the entries split the positions
into classes (``lookup.classes``): a chosen pair's positions; a chosen token's positions that no chosen
pair covers (the back-off from a pair to its token); the rest. Each class is predicted by its mean on
the explaining half. **Score** = Pearson correlation of prediction and activation over the held-out
positions, for K in ``K_VALUES`` and "all" (every token seen on the explaining half, and for the
context variant every pair of the pair vocabulary too; the unit's mean for the rest: the token
variant's "all" is the earlier whole-table simulation score). A unit that does not vary on the
held-out half, or whose prediction does not, has no score (None).

**Sensitivity and specificity** of the K = 5 token explanation on the held-out half: a position is
*strongly active* when ``|a - mu| >= STRONG * max |a - mu|`` (the maximum over the explaining half),
and the explanation's *active tokens* are its entries whose mean is itself that far from ``mu``
(entries that only say where the unit is low do not describe when it is active). Sensitivity = the
share of strongly active positions that hold an active token; specificity = the share of positions
holding an active token that are strongly active.

What these cannot see: explanations that are not about token identity (position, topic, syntax
beyond the previous token), weak activity (sensitivity and specificity count strong positions only),
and whether a person would find the listed tokens coherent. Everything streams as sums per (unit,
token) and (unit, pair) table; nothing keeps activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .lookup import classes, greedy
from .pool import MIN_COUNT, dense_pool, sparse_pool
from .tokens import DENSE_TOKEN_TABLE_LIMIT, Nonzeros, SummedTables, TokenTable

K_VALUES = (1, 2, 5, 10, 20)
HEADLINE_K = 5       # the per-unit headline score, and the explanation sensitivity/specificity judge
N_PAIRS = 4096       # (previous token, token) pairs a context explanation may use
STRONG = 0.5         # strongly active: at least this share of the largest deviation from the mean
UNIT_BLOCK = 1 << 22  # [units, vocab] entries ranked at once (bounds the read-out's memory)


def pair_vocabulary(prev: torch.Tensor, tokens: torch.Tensor, vocab: int, min_count: int = MIN_COUNT,
                    cap: int = N_PAIRS) -> torch.Tensor:
    """Sorted keys ``prev * vocab + token`` of the ``cap`` most frequent pairs seen ``min_count`` times
    among (``prev``, ``tokens``) (the explaining half's positions; ``prev < 0``: no previous token)."""
    keys = prev[prev >= 0].long() * vocab + tokens[prev >= 0].long()
    uniq, counts = keys.unique(return_counts=True)
    ok = counts >= min_count
    uniq, counts = uniq[ok], counts[ok]
    if len(uniq) > cap:   # ties in count: the smaller key first, so the choice is a function of the data
        order = torch.argsort(counts * (uniq.max() + 1) - uniq, descending=True, stable=True)[:cap]
        uniq = uniq[order]
    return uniq.sort().values


def pair_ids(keys: torch.Tensor, prev: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Index of each position's (prev, token) pair in ``keys``, or -1 where it is not there."""
    if len(keys) == 0:
        return torch.full_like(tokens, -1, dtype=torch.long)
    want = prev.long() * vocab + tokens.long()
    pos = torch.searchsorted(keys, want).clamp_max(len(keys) - 1)
    return torch.where((keys[pos] == want) & (prev >= 0), pos, torch.full_like(pos, -1))


@dataclass
class Entries:
    """Each unit's ranked explanation: ``[U, n]`` tensors (``valid`` False past the unit's candidates)."""

    token: torch.Tensor      # token id of each entry
    prev: torch.Tensor       # previous token id of a pair entry, -1 for a token entry
    valid: torch.Tensor
    e_sum: torch.Tensor      # the unit's sum over the entry's explaining positions
    e_cnt: torch.Tensor
    h_sum: torch.Tensor      # ... over its held-out positions
    h_cnt: torch.Tensor

    @property
    def is_pair(self) -> torch.Tensor:
        return self.prev >= 0

    @property
    def mean(self) -> torch.Tensor:
        return self.e_sum / self.e_cnt.clamp_min(1)

    def first(self, n: int) -> Entries:
        """The first ``n`` entries (explanations are nested: the same as ranking ``n`` alone)."""
        return Entries(*(t[:, :n] for t in (self.token, self.prev, self.valid, self.e_sum, self.e_cnt, self.h_sum,
                                             self.h_cnt)))


class Explanations:
    """Streaming sums for the explanation scores of ``n_units`` units (one unit set)."""

    def __init__(self, n_units: int, vocab: int, pair_keys: torch.Tensor, device: str | torch.device = "cpu",
                 dense_limit: int = DENSE_TOKEN_TABLE_LIMIT):
        self.n_units, self.vocab = n_units, vocab
        self.device = torch.device(device)
        self.pair_keys = pair_keys.to(self.device)
        self.tokens = [TokenTable(n_units, vocab, device, dense_limit) for _ in range(2)]     # explaining, held
        self.pairs = [TokenTable(n_units, len(pair_keys), device, dense_limit) for _ in range(2)]
        z = lambda: torch.zeros(n_units, dtype=torch.float64, device=self.device)  # noqa: E731
        self.held_sq = z()
        self.dev_max = torch.full((n_units,), float("-inf"), device=self.device)   # max, and -min, on the
        self.dev_min = torch.full((n_units,), float("-inf"), device=self.device)   # explaining half
        self.strong, self.strong_on, self.on = z(), z(), z()
        self.headline: torch.Tensor | None = None   # [U, HEADLINE_K] token ids, once the explaining half is in
        self._ranked: dict[bool, Entries] = {}     # the read-out's rankings by variant, once both halves are in

    @property
    def all_tokens(self) -> SummedTables:
        """Both halves' per-token sums, read as one table (the records' top input tokens)."""
        return SummedTables(*self.tokens)

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, prev: torch.Tensor, held: bool,
               nz: Nonzeros | None = None) -> None:
        """``acts [T, U]`` at text positions with ``tokens [T]`` and their previous tokens ``prev [T]``
        (-1: none); ``held`` says which half the positions are in (the explaining half comes first);
        ``nz``: the batch's nonzeros, when it is sparse enough to be read by them."""
        acts = acts.to(self.device).float()
        tokens, prev = tokens.to(self.device).long(), prev.to(self.device).long()
        half = int(held)
        self._ranked.clear()
        if held and self.headline is None:
            self.finish_explaining()
        self.tokens[half].add(acts, tokens, nz)
        pid = pair_ids(self.pair_keys, prev, tokens, self.vocab)
        on = pid >= 0
        if nz is None:
            self.pairs[half].add(acts[on], pid[on])
        else:   # the nonzeros at positions with a pair, renumbered to those positions
            keep = on[nz.t]
            at = torch.cumsum(on, 0) - 1
            self.pairs[half].add(None, pid[on], Nonzeros(at[nz.t[keep]], nz.u[keep], nz.v[keep],
                                                         (int(on.sum()), nz.shape[1])))
        if not held:
            hi, lo = (nz.extreme("amax"), nz.extreme("amin")) if nz is not None else acts.aminmax(dim=0)[::-1]
            self.dev_max = torch.maximum(self.dev_max, hi)
            self.dev_min = torch.maximum(self.dev_min, -lo)
            return
        if nz is not None:
            return self._held_sparse(nz, tokens)
        self.held_sq += acts.square().sum(0, dtype=torch.float64)
        strong = (acts - self.mu.float()).abs() >= self.threshold.float()          # [T, U]
        member = tokens[:, None] == self.headline[None, :, 0]                       # [T, U]
        for k in range(1, self.headline.shape[1]):
            member |= tokens[:, None] == self.headline[None, :, k]
        self.strong += strong.sum(0, dtype=torch.float64)
        self.strong_on += (strong & member).sum(0, dtype=torch.float64)
        self.on += member.sum(0, dtype=torch.float64)

    def _held_sparse(self, nz: Nonzeros, tokens: torch.Tensor) -> None:
        """The held-out half's counts from the nonzeros: at a zero activation, strength is a per-unit
        constant (``|mu| >= threshold``), and headline membership depends on the token alone, so the zeros
        are counted from the batch's token counts."""
        T, U = nz.shape
        mu, thr = self.mu.float(), self.threshold.float()
        u = nz.u
        self.held_sq += torch.zeros_like(self.held_sq).index_add_(0, u, nz.v.square().double())
        strong_nz = (nz.v - mu[u]).abs() >= thr[u]
        head = self.headline
        member_nz = (head[u] == tokens[nz.t][:, None]).any(1)
        # positions holding a headline token, per unit: its distinct tokens' counts in the batch
        first = torch.ones_like(head, dtype=torch.bool)
        ordered = head.sort(1).values
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        hist = torch.bincount(tokens, minlength=self.vocab)
        on = (hist[ordered.clamp_min(0)] * ((ordered >= 0) & first)).sum(1)
        zeros = T - nz.count()
        zero_strong = ((0.0 - mu).abs() >= thr).double()
        count = lambda mask: torch.zeros_like(self.strong).index_add_(0, u, mask.double())  # noqa: E731
        member_zeros = on - torch.bincount(u[member_nz], minlength=U)
        self.strong += zero_strong * zeros + count(strong_nz)
        self.strong_on += zero_strong * member_zeros + count(strong_nz & member_nz)
        self.on += on.double()

    def finish_explaining(self) -> None:
        """The explaining half is in: the unit's mean, its strong-activity threshold, and the tokens of its
        headline explanation (which the held-out half's sensitivity and specificity are counted against)."""
        E = self.tokens[0]
        n = float(E.count.sum())
        self.mu = self._unit_totals(E) / max(n, 1.0)
        if n == 0:
            self.mu.zero_()
        spread = torch.maximum(self.dev_max.double() - self.mu, self.dev_min.double() + self.mu)
        self.threshold = STRONG * spread.clamp_min(0) if n else torch.full_like(self.mu, float("inf"))
        # the tokens of the headline explanation on which the unit is strongly active on average: entries that
        # only say where it is low do not describe when it is active
        e = self.ranked(context=False, n=HEADLINE_K)
        strong = e.valid & ((e.mean - self.mu[:, None]).abs() >= self.threshold[:, None])
        self.headline = torch.where(strong, e.token, torch.full_like(e.token, -1))

    def _unit_totals(self, table: TokenTable) -> torch.Tensor:
        if table.dense:
            return table.sums.double().sum(1)
        u, _, v = table.entries()
        return torch.zeros(self.n_units, dtype=torch.float64, device=self.device).index_add_(0, u, v)

    # -- explanations ------------------------------------------------------------------------------
    def _tables(self, context: bool) -> list[tuple[TokenTable, int]]:
        """The explaining half's tables a variant ranks, with each one's first column in the joined
        [tokens | pairs] vocabulary."""
        return [(self.tokens[0], 0)] + ([(self.pairs[0], self.vocab)] if context and len(self.pair_keys) else [])

    def ranked(self, context: bool, n: int = max(K_VALUES)) -> Entries:
        """Each unit's explanation of ``n`` entries (tokens, and pairs when ``context``), in the order the
        greedy choice takes them (``lookup.greedy``) from the ``POOL`` best candidates on their own."""
        done = self._ranked.get(context)
        if done is not None and n <= done.token.shape[1]:
            return done.first(n)
        U, V = self.n_units, self.vocab
        width = V + (len(self.pair_keys) if context else 0)
        step = max(1, UNIT_BLOCK // max(1, width))
        sparse = not self.tokens[0].dense
        picks, oks = [], []
        for a in range(0, U, step):
            b = min(U, a + step)
            idx, ok = (sparse_pool if sparse else dense_pool)(self._tables(context), a, b, self.mu)
            picks.append(idx)
            oks.append(ok)
        pool = self._entries(torch.cat(picks), torch.cat(oks))
        n_e = float(self.tokens[0].count.sum())
        order = greedy(pool.e_sum, pool.e_cnt, pool.is_pair, pool.token, pool.valid, self.mu * n_e, n_e, n)
        keep = order >= 0
        at = order.clamp_min(0)
        pick = lambda t: t.gather(1, at)  # noqa: E731
        return Entries(pick(pool.token), pick(pool.prev), keep, *(pick(t) * keep for t in
                       (pool.e_sum, pool.e_cnt, pool.h_sum, pool.h_cnt)))

    def _entries(self, col: torch.Tensor, valid: torch.Tensor) -> Entries:
        """Entries for columns of the joined [tokens | pairs] vocabulary, with their sums on both halves."""
        V, P = self.vocab, len(self.pair_keys)
        col = torch.where(valid, col, torch.zeros_like(col))
        is_pair = col >= V
        pid = (col - V).clamp_min(0)
        key = self.pair_keys[pid.clamp_max(max(P - 1, 0))] if P else torch.zeros_like(col)
        token = torch.where(is_pair, key % V, col)
        prev = torch.where(is_pair, key // V, torch.full_like(col, -1))
        units = torch.arange(self.n_units, device=self.device)[:, None].expand_as(col)

        def stat(half: int) -> tuple[torch.Tensor, torch.Tensor]:
            tok_t, pair_t = self.tokens[half], self.pairs[half]
            s = tok_t.lookup(units, token)
            c = tok_t.count[token].double()
            if P:
                s = torch.where(is_pair, pair_t.lookup(units, pid.clamp_max(P - 1)), s)
                c = torch.where(is_pair, pair_t.count[pid.clamp_max(P - 1)].double(), c)
            return s * valid, c * valid

        (es, ec), (hs, hc) = stat(0), stat(1)
        return Entries(token, prev, valid, es, ec, hs, hc)

    # -- scores ------------------------------------------------------------------------------------
    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"tokens": {K: [U] float64}, "context": {...}}`` for K in ``K_VALUES`` and "all", plus
        ``sensitivity`` and ``specificity`` ``[U]`` (NaN where undefined); on the host."""
        if self.headline is None:
            self.finish_explaining()
        out: dict = {}
        for name, context in (("tokens", False), ("context", True)):
            entries = self._ranked[context] = self.ranked(context)     # the records' headlines read it again
            out[name] = {str(k): self._prefix_score(entries, k).cpu() for k in K_VALUES}
            out[name]["all"] = self._all_score(context).cpu()
        nan = torch.full((self.n_units,), float("nan"), dtype=torch.float64, device=self.device)
        out["sensitivity"] = torch.where(self.strong > 0, self.strong_on / self.strong.clamp_min(1), nan).cpu()
        out["specificity"] = torch.where(self.on > 0, self.strong_on / self.on.clamp_min(1), nan).cpu()
        return out

    def _held_totals(self) -> tuple[float, torch.Tensor]:
        H = self.tokens[1]
        return float(H.count.sum()), self._unit_totals(H)

    def _pearson(self, n: float, s_p, s_pp, s_pt, s_t) -> torch.Tensor:
        cov = n * s_pt - s_p * s_t
        var_p = n * s_pp - s_p.pow(2)
        var_t = n * self.held_sq - s_t.pow(2)
        ok = (var_p > 1e-12 * n * s_pp.abs().clamp_min(1e-30)) & (var_t > 1e-12 * n * self.held_sq.clamp_min(1e-30))
        out = torch.full((self.n_units,), float("nan"), dtype=torch.float64, device=self.device)
        out[ok] = cov[ok] / (var_p[ok] * var_t[ok]).sqrt()
        return out

    def _prefix_score(self, e: Entries, k: int) -> torch.Tensor:
        """The score of each unit's first ``k`` entries: each class predicted by its explaining mean."""
        inside = e.valid & (torch.arange(e.valid.shape[1], device=self.device) < k)
        e_cnt = classes(e.e_cnt, e.is_pair, e.token, inside)
        inside &= e_cnt > 0                    # a token all of whose explaining positions its pairs took
        e_cnt, e_sum, h_cnt, h_sum = (classes(x, e.is_pair, e.token, inside) for x in (e.e_cnt, e.e_sum, e.h_cnt,
                                                                                      e.h_sum))
        m = torch.where(inside, e_sum / e_cnt.clamp_min(1), torch.zeros_like(e_sum))
        n_e = float(self.tokens[0].count.sum())
        rest_cnt = n_e - e_cnt.sum(1)
        mu_rest = torch.where(rest_cnt > 0, (self.mu * n_e - e_sum.sum(1)) / rest_cnt.clamp_min(1), self.mu)
        n, y = self._held_totals()
        free = n - h_cnt.sum(1)
        s_p = (m * h_cnt).sum(1) + mu_rest * free
        s_pp = (m.pow(2) * h_cnt).sum(1) + mu_rest.pow(2) * free
        s_pt = (m * h_sum).sum(1) + mu_rest * (y - h_sum.sum(1))
        return self._pearson(n, s_p, s_pp, s_pt, y)

    def _all_score(self, context: bool) -> torch.Tensor:
        """Every token seen on the explaining half as an entry (and, for the context variant, every pair of
        the vocabulary seen there, the token classes then holding the token's other positions); the
        unit's mean for the rest."""
        E, H = self.tokens
        V, U = self.vocab, self.n_units
        n, y = self._held_totals()
        c_e, c_h = E.count.double(), H.count.double()
        tables = [(E.entries(), H.entries())]
        if context and len(self.pair_keys):
            Pe, Ph = self.pairs
            known = Pe.count > 0
            ptok = self.pair_keys % V
            moved = lambda c: torch.zeros(V, dtype=torch.float64, device=self.device).index_add_(  # noqa: E731
                0, ptok, torch.where(known, c.double(), 0.0))
            c_e, c_h = c_e - moved(Pe.count), c_h - moved(Ph.count)
            # token classes lose their known pairs' sums; the pairs are classes of their own (mean 0 where the
            # unit never moved on them on the explaining half: no table entry)
            tables = [(_minus(E.entries(), Pe.entries(), ptok, known, V), _minus(H.entries(), Ph.entries(), ptok,
                                                                                    known, V))]
            pe, ph = Pe.entries(), Ph.entries()
            tables.append(((pe[0], pe[1], pe[2]), (ph[0], ph[1], ph[2])))
            counts = [(c_e, c_h), (Pe.count.double(), Ph.count.double())]
            covered = float(c_h[c_e > 0].sum()) + float(Ph.count.double()[known].sum())
        else:
            counts = [(c_e, c_h)]
            covered = float(c_h[c_e > 0].sum())
        zero = lambda: torch.zeros(U, dtype=torch.float64, device=self.device)  # noqa: E731
        s_p, s_pp, s_pt, h_cov = zero(), zero(), zero(), zero()
        for ((eu, ec, ev), (hu, hc, hv)), (ce, ch) in zip(tables, counts):
            width = len(ce)
            m = ev / ce[ec].clamp_min(1)
            live = ce[ec] > 0
            s_p.index_add_(0, eu[live], (m * ch[ec])[live])
            s_pp.index_add_(0, eu[live], (m.pow(2) * ch[ec])[live])
            seen = ce[hc] > 0
            m_h = _at(eu * width + ec, ev, hu * width + hc) / ce[hc].clamp_min(1)
            s_pt.index_add_(0, hu[seen], (m_h * hv)[seen])
            h_cov.index_add_(0, hu[seen], hv[seen])
        free = n - covered
        return self._pearson(n, s_p + self.mu * free, s_pp + self.mu.pow(2) * free, s_pt + self.mu * (y - h_cov), y)


def _minus(tok: tuple, pair: tuple, ptok: torch.Tensor, known: torch.Tensor, vocab: int) -> tuple:
    """Token entries (unit, token, sum) minus the known pairs' entries folded onto their tokens, merged."""
    pu, pp, pv = pair
    ok = known[pp]
    keys = torch.cat([tok[0] * vocab + tok[1], pu[ok] * vocab + ptok[pp[ok]]])
    uniq, inv = keys.unique(return_inverse=True)
    vals = torch.zeros(len(uniq), dtype=torch.float64, device=keys.device).index_add_(
        0, inv, torch.cat([tok[2], -pv[ok]]))
    return uniq // vocab, uniq % vocab, vals


def _at(keys: torch.Tensor, vals: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """``vals`` at the keys ``want`` (0 where absent); ``keys`` sorted and unique."""
    if len(keys) == 0:
        return torch.zeros(want.shape, dtype=torch.float64, device=want.device)
    pos = torch.searchsorted(keys, want).clamp_max(len(keys) - 1)
    return torch.where(keys[pos] == want, vals[pos], torch.zeros((), dtype=torch.float64, device=want.device))
