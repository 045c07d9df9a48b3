"""The read-out of an interpretation: every unit's record (label, density, activations, histogram, top
input tokens, top contexts, logit lens, scores, explanation) from the streamed statistics, built a
block of units at a time."""
from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from itertools import islice

import torch

from ..models import LM
from .explain import HEADLINE_K, Explanations
from .lens import lens_topk, unit_directions
from .score import concentration_many, token_entropy_many
from .stats import UnitStats


def token_strings(tokenizer, n: int | None = None) -> list[str]:
    """The text of every token id below ``n`` (default: the tokenizer's size). Models often have more
    unembedding rows than the tokenizer has tokens (padded vocabularies, e.g. Pythia's 50304 rows for
    50277 tokens); the logit lens can rank those rows, so they get a name too."""
    size = len(tokenizer)
    return [tokenizer.decode([i]) if i < size else f"<unused {i}>" for i in range(max(size, n or 0))]


CONTEXT_MARGIN = 0.1   # the context explanation "clearly" beats tokens alone: by this much at the headline K


def label_for(top_tokens: list[dict], contexts: list[dict], pair: dict | None = None) -> str:
    """A short name from the top input tokens (or, failing that, the tokens at the top activations); a
    unit that the context explanation reads clearly better is named by its best pair, e.g.
    ``towns (after " her")``."""
    if pair is not None:
        return f"{pair['token'].strip() or repr(pair['token'])} (after {json.dumps(pair['prev'])})"
    words = [t["token"].strip() or repr(t["token"]) for t in top_tokens[:3]]
    if not words:
        words = list(dict.fromkeys(c["tokens"][c["max_index"]].strip() for c in contexts))[:3]
    return " / ".join(words) if words else "(never fires)"


def _sig(v: float, digits: int = 5) -> float:
    """Round to significant digits (small activations keep their precision in the JSON); the reference
    for ``sig_round``."""
    return float(f"{v:.{digits}g}")


def sig_round(x: torch.Tensor, digits: int = 5) -> torch.Tensor:
    """``_sig`` of every element at once (float64): scale by a power of ten, round, scale back. Near a rounding
    tie it can land one unit off in the last kept digit, and below ~1e-18 or above ~1e25 (where the power of
    ten is inexact) one double ulp off; zeros and non-finite values pass through."""
    x = x.double()
    live = x.isfinite() & (x != 0)
    places = digits - 1 - torch.where(live, x.abs(), torch.ones_like(x)).log10().floor()
    up, down = torch.pow(10.0, places.clamp_min(0)), torch.pow(10.0, (-places).clamp_min(0))  # one of them is 1
    return torch.where(live, torch.round(x * up / down) * down / up, x)


N_CONTEXTS = 10     # top contexts shown per unit, each with its window of tokens
READ_BLOCK = 4096   # units read out at once: bounds the [units, top_n, window] tensors and their lists


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: the records are millions of small acyclic lists and dicts, and
    while they are built it would rescan every live object again and again (~40% of the read-out's time)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def unit_records(lm: LM, kind: str, site, sae, stats: UnitStats, tokens: torch.Tensor, strings: list[str], *,
                 top_k_tokens: int = 10, min_count: int = 5, n_contexts: int = N_CONTEXTS,
                 explanations: Explanations | None = None) -> list[dict]:
    """One record per unit of a unit set (``kind`` at ``site``; see the module docstring), with its
    explanation scores where ``explanations`` is given. Every number is computed for a block of units at
    once and reaches Python with one ``tolist`` per tensor; only the dicts are built per unit."""
    lens = lens_topk(lm, unit_directions(lm, kind, site, sae))
    tokens = tokens.to(stats.top_idx.device)   # the read-out runs where the statistics are (the host)
    records = []
    with _gc_paused():
        explained = _explained(explanations, strings) if explanations is not None else None
        for start in range(0, stats.n_units, READ_BLOCK):
            stop = min(stats.n_units, start + READ_BLOCK)
            records += _block_records(stats, tokens, strings, lens, explained, start, stop,
                                      top_k_tokens=top_k_tokens, min_count=min_count, n_contexts=n_contexts)
    return records


def _explained(ex: Explanations, strings: list[str]) -> list[dict]:
    """Per unit: its explanation scores by variant and length, sensitivity, specificity, and its
    headline-length explanations in words."""
    scores = ex.scores()
    rounded = {name: {k: [_finite(v, 4) for v in t.tolist()] for k, t in scores[name].items()}
               for name in ("tokens", "context")}
    sens, spec = ([_finite(v, 4) for v in scores[key].tolist()] for key in ("sensitivity", "specificity"))
    words = {}
    for name, context in (("tokens", False), ("context", True)):
        e = ex.ranked(context, HEADLINE_K)
        cols = zip(e.valid.tolist(), e.token.tolist(), e.prev.tolist(), sig_round(e.mean, 4).tolist())
        words[name] = [[{"token": strings[t], "mean": m, **({"prev": strings[p]} if p >= 0 else {})}
                        for ok, t, p, m in zip(*row) if ok] for row in cols]
    out = []
    for u in range(ex.n_units):
        by = {name: {k: rounded[name][k][u] for k in rounded[name]} for name in rounded}
        tok5, ctx5 = by["tokens"][str(HEADLINE_K)], by["context"][str(HEADLINE_K)]
        first = words["context"][u][0] if words["context"][u] else None
        clearer = (tok5 is not None and ctx5 is not None and ctx5 >= tok5 + CONTEXT_MARGIN and first is not None
                   and "prev" in first)
        out.append({"scores": by, "explain_score": tok5, "sensitivity": sens[u], "specificity": spec[u],
                    "explanation": {"tokens": words["tokens"][u], "context": words["context"][u]},
                    "context_label": first if clearer else None})
    return out


def _block_records(stats: UnitStats, tokens: torch.Tensor, strings: list[str], lens: tuple[torch.Tensor, ...],
                   explained: list[dict] | None, start: int, stop: int, *, top_k_tokens: int, min_count: int,
                   n_contexts: int) -> list[dict]:
    """The records of units ``start:stop``: each field computed for all of them, then one dict per unit."""
    tops = _top_token_lists(stats, start, stop, strings, top_k_tokens, min_count)
    contexts = _context_lists(stats, start, stop, tokens, strings, n_contexts)
    lenses = _lens_dicts([t[start:stop] for t in lens], strings)
    fires = stats.fires[start:stop]
    max_act = torch.where(fires > 0, stats.max[start:stop], 0.0)
    mean_act = torch.where(fires > 0, stats.act_sum[start:stop] / fires.clamp_min(1), 0.0)
    top_val, top_tok = stats.top_val[start:stop], tokens[stats.top_idx[start:stop].clamp_min(0)]
    expl = explained[start:stop] if explained is not None else [{}] * (stop - start)
    columns = zip(range(start, stop), tops, contexts, lenses, stats.density()[start:stop].tolist(),
                  max_act.tolist(), mean_act.tolist(), stats.hist[start:stop].tolist(),
                  concentration_many(top_val, top_tok), token_entropy_many(top_val, top_tok), expl)
    records = []
    for u, top, ctx, lens_u, density, mx, mean, hist, score, entropy, e in columns:
        e = dict(e)
        pair = e.pop("context_label", None)
        records.append({"id": u, "label": label_for(top, ctx, pair), "density": density, "max_act": mx,
                        "mean_act": mean, "top_tokens": top, "contexts": ctx, "logit_lens": lens_u, "hist": hist,
                        "score": score, "entropy": entropy, **e})
    return records


def _top_token_lists(stats: UnitStats, start: int, stop: int, strings: list[str], k: int,
                     min_count: int) -> list[list[dict]]:
    """Per unit of ``start:stop``: its top input tokens with a positive mean (``UnitStats.top_tokens``)."""
    ids, means, counts = stats.top_tokens_block(start, stop, k, min_count)
    rows = zip(ids.tolist(), sig_round(means).tolist(), counts.tolist(), (means > 0).tolist())
    return [[{"token": strings[t], "id": t, "mean": m, "count": c} for t, m, c, ok in zip(*row) if ok]
            for row in rows]


def _context_lists(stats: UnitStats, start: int, stop: int, tokens: torch.Tensor, strings: list[str],
                   n: int) -> list[list[dict]]:
    """Per unit of ``start:stop``: its top contexts up to the first non-positive value (at most ``n``),
    each with the window's tokens and activations where the window lies inside the row. The kept window
    entries of all units go to Python as one flat list each; every context is a slice of them."""
    n = min(n, stats.n_windows)
    val, centre = stats.top_val[start:stop, :n], stats.top_idx[start:stop, :n]
    win = stats.top_win_idx[start:stop, :n]
    used = (val > 0).long().cumprod(1)                        # [units, n]: 0 from the first non-positive on
    keep = (win >= 0) & used.bool()[..., None]
    flat_tokens = list(map(strings.__getitem__, tokens[win[keep]].tolist()))
    flat_acts = sig_round(stats.top_win_act[start:stop, :n][keep], 4).tolist()
    widths = keep.sum(-1)
    ends = widths.flatten().cumsum(0).view_as(widths)         # each context's end in the flat lists
    max_index = (keep & (win < centre[..., None])).sum(-1)  # window indices grow along the window
    columns = zip(used.sum(1).tolist(), (ends - widths).tolist(), ends.tolist(), max_index.tolist(),
                  sig_round(val).tolist(), centre.tolist())
    return [[{"tokens": flat_tokens[a:b], "acts": flat_acts[a:b], "max_index": m, "max": v, "token_index": t}
             for a, b, m, v, t in islice(zip(starts, stops, max_u, val_u, centre_u), n_used)]
            for n_used, starts, stops, max_u, val_u, centre_u in columns]


def _lens_dicts(lens: list[torch.Tensor], strings: list[str]) -> list[dict]:
    """Per unit: the logit lens's promoted and suppressed tokens by name (``lens_topk``'s tensors)."""
    up_ids, up_vals, down_ids, down_vals = lens
    named = lambda ids, vals: [[strings[t], v] for t, v in zip(ids, vals)]  # noqa: E731
    return [{"promoted": named(a, b), "suppressed": named(c, d)}
            for a, b, c, d in zip(up_ids.tolist(), sig_round(up_vals, 4).tolist(), down_ids.tolist(),
                                  sig_round(down_vals, 4).tolist())]


def _finite(v, digits: int = 5) -> float | None:
    v = float(v)
    return None if v != v else round(v, digits)
