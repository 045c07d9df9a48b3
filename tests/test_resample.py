"""Resampling of dead and duplicated latents (sae/resample.py), checked on hand-made cases."""
import math

import pytest
import torch

from sc_steer.sae import SAEConfig, make_sae
from sc_steer.sae.resample import ENCODER_SCALE, duplicates, resample
from sc_steer.sae.optim import make_optimizer


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_of_each_group_of_twins_the_most_frequent_stays():
    rows = torch.stack([unit(1, 0, 0), unit(1, 0.01, 0), unit(1, -0.01, 0),   # three twins
                        unit(0, 1, 0), unit(0, 1, 0),                          # two twins, same counts
                        unit(0, 0.6, 0.8), unit(0, 0, 1)])                    # cos 0.8 with their neighbours
    counts = torch.tensor([5.0, 9.0, 1.0, 3.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    assert duplicates(rows, counts).tolist() == [True, False, True, False, True, False, False]
    # the first three sit at cosines 0.9998-0.99995 of each other; rows 3 and 4 are equal
    assert duplicates(rows, counts, cos=0.99999).tolist() == [False] * 4 + [True, False, False]


def test_duplicates_are_found_across_blocks(monkeypatch):
    import sc_steer.sae.resample as rs
    monkeypatch.setattr(rs, "_BLOCK", 3)
    w = torch.randn(10, 16)
    w[8] = w[1] * 2   # twins in different blocks; row 8 fired more
    counts = torch.arange(10, dtype=torch.float64)
    want = torch.zeros(10, dtype=torch.bool)
    want[1] = True
    assert duplicates(w, counts).tolist() == want.tolist()


def step_once(sae, x):
    opt = make_optimizer(sae, 1e-2)
    loss = (sae(x) - x).pow(2).sum()
    loss.backward()
    opt.step()
    return opt


def test_picked_latents_start_again_from_the_worst_residuals():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(architecture="relu", d_in=6, d_sae=5))
    x = torch.randn(40, 6) * 0.01
    x[7] = torch.tensor([0.0, 3.0, 0.0, 4.0, 0.0, 0.0])   # the one row the SAE gets badly wrong
    opt = step_once(sae, x)
    before = {k: v.detach().clone() for k, v in sae.named_parameters()}
    moments = {k: {m: opt.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")} for k, p in sae.named_parameters()}
    with torch.no_grad():
        x_hat = sae(x)
    e = x - x_hat
    # the row drawn has probability ||e||^4 / sum ||e||^4: row 7 all but surely (the rest weigh ~1e-7 of it)
    assert float(e.norm(dim=1).pow(4)[7] / e.norm(dim=1).pow(4).sum()) > 1 - 1e-6
    picked = torch.tensor([False, False, True, False, False])
    reset = resample(sae, opt, picked, x, x_hat, torch.Generator().manual_seed(0))
    assert reset.tolist() == [2]
    want = e[7] / e[7].norm()
    torch.testing.assert_close(sae.W_dec[2].detach(), want)
    others = [0, 1, 3, 4]
    enc_norm = before["W_enc"][:, others].norm(dim=0).mean()
    torch.testing.assert_close(sae.W_enc[:, 2].detach(), want * ENCODER_SCALE * enc_norm)
    assert float(sae.b_enc[2]) == 0
    for name, p in sae.named_parameters():   # everything else untouched, moments of the reset entries zero
        keep = {"W_dec": (others,), "W_enc": (slice(None), others), "b_enc": (others,), "b_dec": (slice(None),)}[name]
        torch.testing.assert_close(p.detach()[keep], before[name][keep])
        for m in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][m]
            torch.testing.assert_close(state[keep], moments[name][m][keep])
            if name != "b_dec":
                gone = (2,) if name != "W_enc" else (slice(None), 2)
                assert not state[gone].any()


def test_more_picked_latents_than_rows_wait_for_the_next_round():
    torch.manual_seed(1)
    sae = make_sae(SAEConfig(architecture="topk", d_in=4, d_sae=8, k=2))
    x = torch.randn(3, 4)
    opt = step_once(sae, x)
    reset = resample(sae, opt, torch.ones(8, dtype=torch.bool), x, torch.zeros_like(x), torch.Generator().manual_seed(0))
    assert reset.tolist() == [0, 1, 2]
    rows = sae.W_dec.detach()[:3]
    assert torch.allclose(rows.norm(dim=1), torch.ones(3))
    # three distinct rows of x, each once (drawn without replacement)
    cos = rows @ (x / x.norm(dim=1, keepdim=True)).T
    assert sorted(cos.argmax(dim=1).tolist()) == [0, 1, 2] and math.isclose(float(cos.max(dim=1).values.min()), 1, rel_tol=1e-5)


class TwoPassDist:
    """Stand-in collectives for ``world`` ranks run one after another: a first pass records what each
    rank contributes, a second hands every rank the true result (the gathered list or the sum)."""

    def __init__(self, rank, world, book):
        self.rank, self.world, self.active, self.book = rank, world, True, book

    def all_gather(self, v, what):
        self.book.setdefault(("gather", what), {})[self.rank] = v.clone()
        done = self.book.get(("result", "gather", what))
        return done if done is not None else [torch.zeros_like(v)] * self.world

    def all_reduce_(self, v, what, op="sum"):
        self.book.setdefault(("reduce", what), {})[self.rank] = v.clone()
        done = self.book.get(("result", "reduce", what))
        return v.copy_(done) if done is not None else v


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_rows_are_the_whole_batch(world):
    """``all_rows`` and ``rows_at`` over the ranks' slices (7 rows: slices of unequal length) give what
    one process computes on the whole batch."""
    from sc_steer.sae.batch import WHOLE, ShardedBatch

    n, t, idx = 7, torch.randn(7, 3), torch.tensor([6, 0, 3, 4])

    def on_ranks(fn):
        book, outs = {}, []
        for second in (False, True):
            if second:
                for (kind, what), parts in list(book.items()):
                    if kind in ("gather", "reduce"):
                        ranked = [parts[r] for r in range(world)]
                        book[("result", kind, what)] = ranked if kind == "gather" else sum(ranked)
            outs = [fn(ShardedBatch(TwoPassDist(r, world, book), n), t[n * r // world:n * (r + 1) // world])
                    for r in range(world)]
        return outs

    for got in on_ranks(lambda b, mine: b.all_rows(mine.sum(1))):
        torch.testing.assert_close(got, WHOLE.all_rows(t.sum(1)))
    for got in on_ranks(lambda b, mine: b.rows_at(mine, idx)):
        torch.testing.assert_close(got, WHOLE.rows_at(t, idx))
