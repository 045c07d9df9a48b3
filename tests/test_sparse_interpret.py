"""Interpretation reads sparse SAE batches by their nonzeros: every accumulator equals the dense path's."""
import pytest
import torch

from sc_steer.interpret.explain import Explanations, pair_vocabulary
from sc_steer.interpret.stats import UnitStats
from sc_steer.interpret.tokens import Nonzeros, TokenTable

U, V = 80, 40


def batches(seed, n=6, rows=5, width=40, density=0.01):
    """Sparse non-negative activations (continuous values: no ties but zeros) over whole rows."""
    g = torch.Generator().manual_seed(seed)
    out, row0 = [], 0
    for _ in range(n):
        toks = torch.randint(0, V, (rows * width,), generator=g)
        common = torch.rand(rows * width, generator=g) < 0.5
        toks[common] = torch.randint(0, 30, (int(common.sum()),), generator=g)         # tokens 30+ are rarer
        prev = torch.cat([torch.full((1,), -1), toks[:-1]])
        prev[::width] = -1
        acts = torch.rand(rows * width, U, generator=g) * (torch.rand(rows * width, U, generator=g) < density)
        acts[:, 7] = torch.rand(rows * width, generator=g) + 0.1            # one unit fires everywhere
        # one fires everywhere but on ten rare tokens: its zeros are strong, hold its headline tokens,
        # and explain it best from beyond the most frequent columns
        acts[:, 8] = (2 + torch.rand(rows * width, generator=g)) * (toks < 30)
        for j in range(0, U, 3):                                             # and some read one token
            acts[:, j] += (toks == j % V) * (2 + torch.rand(rows * width, generator=g))
        row = torch.arange(row0, row0 + rows).repeat_interleave(width)
        out.append((acts, toks, prev, row))
        row0 += rows
    return out


@pytest.mark.parametrize("dense_limit", [10**9, 0])      # dense and sparse token tables
def test_sparse_reading_equals_dense_reading(dense_limit):
    data = batches(0)
    ev = [b for i, b in enumerate(data) if i % 2 == 0]
    keys = pair_vocabulary(torch.cat([b[2] for b in ev]), torch.cat([b[1] for b in ev]), V, min_count=2)
    assert len(keys) > 5
    got = {}
    for sparse in (False, True):
        ex = Explanations(U, V, keys, dense_limit=dense_limit)
        st = UnitStats(U, V, top_n=12, window=3, token_sums=ex.all_tokens, windows=4)
        for held in (0, 1):
            for i, (acts, toks, prev, row) in enumerate(data):
                if i % 2 != held:
                    continue
                nz = Nonzeros.of(acts) if sparse else None
                assert (nz is not None) == sparse
                st.update(acts, toks, row, nz)
                ex.update(acts, toks, prev, bool(held), nz)
        got[sparse] = (st, ex)
    (sd, ed), (ss, es) = got[False], got[True]
    for name in ("fires", "hist", "top_idx", "top_win_idx"):
        assert torch.equal(getattr(sd, name), getattr(ss, name)), name
    for name in ("act_sum", "max", "top_val", "top_win_act"):
        torch.testing.assert_close(getattr(sd, name), getattr(ss, name), rtol=1e-6, atol=1e-6)
    for name in ("held_sq", "dev_max", "dev_min", "strong", "strong_on", "on", "mu", "threshold"):
        torch.testing.assert_close(getattr(ed, name), getattr(es, name), rtol=1e-6, atol=1e-6)
    assert torch.equal(ed.headline, es.headline)
    for a, b in zip(ed.tokens + ed.pairs, es.tokens + es.pairs):
        torch.testing.assert_close(a.sums if a.dense else _dense(a), b.sums if b.dense else _dense(b),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(a.count, b.count)
    assert float(ed.strong.sum()) > 0 and float(ed.strong_on.sum()) > 0 and float(sd.top_val[:, 0].min()) > 0
    sa, sb = ed.scores(), es.scores()
    for k in sa["tokens"]:
        torch.testing.assert_close(sa["tokens"][k], sb["tokens"][k], rtol=1e-5, atol=1e-6, equal_nan=True)
    # the read-out takes its headline explanations from the rankings the scores made (explanations nest)
    for context in (False, True):
        kept = es.ranked(context, 5)
        es._ranked.clear()
        fresh = es.ranked(context, 5)
        for name in ("token", "prev", "valid", "e_sum", "e_cnt", "h_sum", "h_cnt"):
            assert torch.equal(getattr(kept, name), getattr(fresh, name)), (context, name)
        assert bool(fresh.valid.any())


def _dense(table: TokenTable) -> torch.Tensor:
    return torch.stack([table.unit_sums(u) for u in range(table.n_units)])


def test_nonzeros_extremes_count_the_zeros():
    acts = torch.tensor([[0.0, 2.0, -1.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])
    nz = Nonzeros(*(acts != 0).nonzero(as_tuple=True), acts[acts != 0], tuple(acts.shape))
    assert nz.extreme("amax").tolist() == [0.0, 3.0, 0.0]          # unit 1 fires everywhere: no zero to count
    assert nz.extreme("amin").tolist() == [0.0, 1.0, -1.0]
    assert nz.count().tolist() == [0, 3, 1]
    assert Nonzeros.of(acts) is None                               # 44% nonzero: read densely


@pytest.mark.parametrize("pool", [4, 64])
def test_the_sparse_pool_holds_the_best_gains_of_every_unit(pool, monkeypatch):
    """The read-out's candidate pool from a sparse table's nonzero sums against ranking every column:
    the same gains for every unit (a unit whose nonzero sums crowd the frequent columns included)."""
    from sc_steer.interpret import pool as pool_mod

    monkeypatch.setattr(pool_mod, "POOL", pool)
    data = batches(1)
    ev = [b for i, b in enumerate(data) if i % 2 == 0]
    keys = pair_vocabulary(torch.cat([b[2] for b in ev]), torch.cat([b[1] for b in ev]), V, min_count=2)
    ex = Explanations(U, V, keys, dense_limit=0)
    for held in (0, 1):
        for i, (acts, toks, prev, _) in enumerate(data):
            if i % 2 == held:
                ex.update(acts, toks, prev, bool(held), Nonzeros.of(acts))
    for context in (False, True):
        tables = ex._tables(context)
        g = torch.cat([pool_mod.gains(t, 0, U, ex.mu) for t, _ in tables], 1)
        d_idx, d_ok = pool_mod.dense_pool(tables, 0, U, ex.mu)
        s_idx, s_ok = pool_mod.sparse_pool(tables, 0, U, ex.mu)
        assert torch.equal(d_ok.sum(1), s_ok.sum(1))
        want = g.gather(1, d_idx).where(d_ok, torch.tensor(-1.0, dtype=g.dtype))
        got = g.gather(1, s_idx).where(s_ok, torch.tensor(-1.0, dtype=g.dtype))
        torch.testing.assert_close(got.sort(1).values, want.sort(1).values, rtol=1e-12, atol=1e-12)
        assert (s_ok.sum(1) > 0).all()
