"""The explanation scores (interpret/explain.py) against a brute-force computation written here with
plain Python lists: greedy explanations, class predictions with the pair back-off, Pearson per length, the
"all" scores, sensitivity and specificity; dense and sparse tables; and the explaining half first."""
import math

import numpy as np
import pytest
import torch

from sc_steer.interpret import explain as ex
from sc_steer.interpret.explain import Explanations, pair_ids, pair_vocabulary


def corpus(seed=0, rows=24, per_row=15, vocab=9, units=6):
    g = torch.Generator().manual_seed(seed)
    row = torch.arange(rows).repeat_interleave(per_row)
    tok = torch.randint(0, vocab, (len(row),), generator=g)
    tok[row % 3 == 0] = torch.randint(0, 3, (int((row % 3 == 0).sum()),), generator=g)   # frequent pairs
    prev = torch.cat([torch.tensor([-1]), tok[:-1]])
    prev[torch.arange(len(row)) % per_row == 0] = -1          # a row's first text token follows BOS
    acts = torch.randn(len(row), units, generator=g) * torch.linspace(0.5, 2, units) + torch.linspace(-1, 1, units)
    acts[:, 1] += 3 * ((prev == 1) & (tok == 2)).float()        # a unit that reads "2 after 1"
    acts[:, 2] += 4 * (tok == 4).float()                        # a unit that reads token 4
    return row, tok, prev, acts


def brute(row, tok, prev, acts, vocab, k_values, min_count, pairs):
    """Per unit: {variant: {K: score}} and (sensitivity, specificity), from the definitions."""
    ex_pos = [i for i in range(len(row)) if row[i] % 2 == 0]
    ho_pos = [i for i in range(len(row)) if row[i] % 2 == 1]
    pair_set = {(k // vocab, k % vocab) for k in pairs.tolist()}
    out = []
    for u in range(acts.shape[1]):
        a = acts[:, u].double().tolist()
        mu = sum(a[i] for i in ex_pos) / len(ex_pos)
        by = {}
        for i in ex_pos:
            by.setdefault(("t", tok[i].item()), []).append(a[i])
            if (prev[i].item(), tok[i].item()) in pair_set:
                by.setdefault(("p", prev[i].item(), tok[i].item()), []).append(a[i])
        mean = {key: sum(v) / len(v) for key, v in by.items()}
        cands = [key for key, v in by.items() if len(v) >= min_count]

        def predict(entries, i):
            p, t = prev[i].item(), tok[i].item()
            if ("p", p, t) in entries:
                return ("p", p, t)
            if ("t", t) in entries:
                return ("t", t)
            return None

        def fit(entries, positions):
            """Each class's mean over ``positions`` (the explaining half), and the rest's."""
            groups = {}
            for i in positions:
                groups.setdefault(predict(entries, i), []).append(a[i])
            return {c: sum(v) / len(v) for c, v in groups.items()}

        def sse(entries):
            means = fit(entries, ex_pos)
            return sum((a[i] - means[predict(entries, i)]) ** 2 for i in ex_pos)

        def greedy(pool, n):
            chosen = []
            for _ in range(n):
                left = [c for c in pool if c not in chosen]
                gains = {c: sse(set(chosen)) - sse(set(chosen) | {c}) for c in left}
                gains = {c: g for c, g in gains.items() if fit(set(chosen) | {c}, ex_pos).get(c) is not None}
                if not gains:
                    break
                chosen.append(max(gains, key=gains.get))
            return chosen

        def score(entries):
            means = fit(entries, ex_pos)
            mu_rest = means.get(None, mu)
            pred = [means[c] if (c := predict(entries, i)) is not None else mu_rest for i in ho_pos]
            true = [a[i] for i in ho_pos]
            if np.std(pred) < 1e-12 or np.std(true) < 1e-12:
                return math.nan
            return float(np.corrcoef(pred, true)[0, 1])

        res = {}
        for name, pool in (("tokens", [k for k in cands if k[0] == "t"]), ("context", cands)):
            order = greedy(pool, max(k_values))
            res[name] = {str(k): score(set(order[:k])) for k in k_values}
            if name == "tokens":
                head_order = order[:ex.HEADLINE_K]
        seen = {k for k in mean if k[0] == "t"}
        res["tokens"]["all"] = score(seen)
        res["context"]["all"] = score(seen | {k for k in mean if k[0] == "p"})
        dev = max(abs(a[i] - mu) for i in ex_pos)
        thr = ex.STRONG * dev
        head = [k for k in head_order if abs(mean[k] - mu) >= thr]
        strong = [i for i in ho_pos if abs(a[i] - mu) >= thr]
        on = [i for i in ho_pos if ("t", tok[i].item()) in head]
        both = [i for i in strong if ("t", tok[i].item()) in head]
        res["sensitivity"] = len(both) / len(strong) if strong else math.nan
        res["specificity"] = len(both) / len(on) if on else math.nan
        out.append(res)
    return out


def stream(row, tok, prev, acts, vocab, pairs, dense_limit, chunk=4):
    """Explaining rows first, then held-out rows, ``chunk`` rows at a time."""
    e = Explanations(acts.shape[1], vocab, pairs, dense_limit=dense_limit)
    for held in (0, 1):
        rows = [r for r in row.unique().tolist() if r % 2 == held]
        for i in range(0, len(rows), chunk):
            m = torch.isin(row, torch.tensor(rows[i:i + chunk]))
            e.update(acts[m], tok[m], prev[m], bool(held))
    return e


@pytest.mark.parametrize("dense_limit", [10**9, 0])
def test_scores_equal_a_brute_force_computation(dense_limit, monkeypatch):
    monkeypatch.setattr(ex, "K_VALUES", (1, 2, 5, 10))
    row, tok, prev, acts = corpus()
    V = 9
    ev = row % 2 == 0
    pairs = pair_vocabulary(prev[ev], tok[ev], V, min_count=3, cap=1000)
    ref = brute(row, tok, prev, acts, V, (1, 2, 5, 10), 3, pairs)
    got = stream(row, tok, prev, acts, V, pairs, dense_limit).scores()
    for u, r in enumerate(ref):
        for name in ("tokens", "context"):
            for k, v in r[name].items():
                g = float(got[name][k][u])
                assert (math.isnan(v) and math.isnan(g)) or g == pytest.approx(v, abs=2e-6), (u, name, k, g, v)
        for key in ("sensitivity", "specificity"):
            g = float(got[key][u])
            assert (math.isnan(r[key]) and math.isnan(g)) or g == pytest.approx(r[key]), (u, key)
    # the planted units: context beats tokens for "2 after 1"; token 4 alone explains unit 2
    assert float(got["context"]["1"][1]) > float(got["tokens"]["1"][1]) + 0.1
    assert float(got["tokens"]["1"][2]) > 0.5 and float(got["sensitivity"][2]) > 0.5


def test_pair_vocabulary_keeps_the_most_frequent_pairs():
    prev = torch.tensor([-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    tok = torch.tensor([5, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 1])
    keys = pair_vocabulary(prev, tok, 10, min_count=3, cap=2)
    assert keys.tolist() == [0 * 10 + 1, 2 * 10 + 3]       # (0,1) x4 and (2,3) x4 beat (1,2) x3
    assert pair_vocabulary(prev, tok, 10, min_count=3, cap=9).tolist() == [1, 12, 23]
    ids = pair_ids(keys, torch.tensor([0, 1, 2, -1]), torch.tensor([1, 2, 3, 1]), 10)
    assert ids.tolist() == [0, -1, 1, -1]


def test_a_unit_the_context_reads_better_is_named_by_its_pair():
    from sc_steer.interpret.readout import _explained, label_for

    row, tok, prev, acts = corpus()
    ev = row % 2 == 0
    pairs = pair_vocabulary(prev[ev], tok[ev], 9, min_count=3, cap=1000)
    names = [f" w{i}" for i in range(9)]
    expl = _explained(stream(row, tok, prev, acts, 9, pairs, 10**9), names)
    assert expl[1]["context_label"] == {"token": " w2", "prev": " w1", "mean": expl[1]["context_label"]["mean"]}
    assert label_for([], [], expl[1]["context_label"]) == 'w2 (after " w1")'
    assert expl[2]["context_label"] is None                      # token 4 alone: no pair in its name
    assert expl[2]["explanation"]["tokens"][0]["token"] == " w4" and "prev" not in expl[2]["explanation"]["tokens"][0]
    assert set(expl[1]["scores"]) == {"tokens", "context"} and set(expl[1]["scores"]["tokens"]) == \
        {"1", "2", "5", "10", "20", "all"}
