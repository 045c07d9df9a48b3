"""Interpret every unit of every layer in one streaming pass: SAE features and the neuron baselines.

For each SAE site, three unit sets are read over the same tokens: the SAE's features, the raw
residual dimensions at that site, and the MLP neurons of that layer (``mlp_act``). Results per unit
(one JSON line each): label, density, max and mean activation, histogram, top input tokens, top
contexts with per-token activations, logit lens, and the interpretability score.
"""
from __future__ import annotations

import gc
import json
import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from .. import rundir, validate
from ..activations import kept, run_sites, text_rows
from ..data import iter_batches, iter_documents, iter_rows, pad_token_id
from ..devices import check_fits, follow_model
from ..errors import ScSteerError
from ..files import atomic_write_text
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .lens import lens_topk, unit_directions
from .score import concentration_many, summarize, token_entropy_many
from .simulation import Simulation, mean_with_ci
from .stats import HIST_EDGES, UnitStats

KIND_TITLES = {"sae": "SAE features", "resid": "residual dimensions", "mlp": "MLP neurons"}


@dataclass
class UnitSet:
    kind: str                      # sae | resid | mlp
    site: Site
    encode: Callable[[torch.Tensor], torch.Tensor]
    n_units: int
    sae: SAE | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.site}"



def unit_sets(lm: LM, saes: dict[str, SAE], neurons: bool = True) -> list[UnitSet]:
    sets = []
    for name, sae in saes.items():
        site = Site.parse(name, lm.n_layers)
        lm.check_sae(site, sae)
        sets.append(UnitSet("sae", site, sae.encode, sae.cfg.d_sae, sae))
        if neurons:
            sets.append(UnitSet("resid", site, lambda h: h, lm.width(site)))
    if neurons:
        for layer in sorted({Site.parse(n, lm.n_layers).layer for n in saes}):
            mlp = Site("mlp_act", layer)
            sets.append(UnitSet("mlp", mlp, lambda h: h, lm.width(mlp)))
    return sets


def token_strings(tokenizer, n: int | None = None) -> list[str]:
    """The text of every token id below ``n`` (default: the tokenizer's size). Models often have more
    unembedding rows than the tokenizer has tokens (padded vocabularies, e.g. Pythia's 50304 rows for
    50277 tokens); the logit lens can rank those rows, so they get a name too."""
    size = len(tokenizer)
    return [tokenizer.decode([i]) if i < size else f"<unused {i}>" for i in range(max(size, n or 0))]


def label_for(top_tokens: list[dict], contexts: list[dict]) -> str:
    """A short name from the top input tokens (or, failing that, the tokens at the top activations)."""
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


def unit_records(lm: LM, us: UnitSet, stats: UnitStats, tokens: torch.Tensor, strings: list[str], *,
                 top_k_tokens: int = 10, min_count: int = 5, n_contexts: int = 10,
                 simulation: torch.Tensor | None = None) -> list[dict]:
    """One record per unit (see the module docstring); ``simulation [U]``: the units' simulation scores.
    Every number is computed for a block of units at once and reaches Python with one ``tolist`` per tensor;
    only the dicts are built per unit (tensor work per unit cost ~1.6 ms, minutes per layer of a 7B model)."""
    lens = lens_topk(lm, unit_directions(lm, us.kind, us.site, us.sae))
    tokens = tokens.to(stats.top_idx.device)   # the read-out runs where the statistics are (the host)
    records = []
    with _gc_paused():
        for start in range(0, us.n_units, READ_BLOCK):
            stop = min(us.n_units, start + READ_BLOCK)
            records += _block_records(stats, tokens, strings, lens, simulation, start, stop,
                                      top_k_tokens=top_k_tokens, min_count=min_count, n_contexts=n_contexts)
    return records


def _block_records(stats: UnitStats, tokens: torch.Tensor, strings: list[str], lens: tuple[torch.Tensor, ...],
                   simulation: torch.Tensor | None, start: int, stop: int, *, top_k_tokens: int, min_count: int,
                   n_contexts: int) -> list[dict]:
    """The records of units ``start:stop``: each field computed for all of them, then one dict per unit."""
    tops = _top_token_lists(stats, start, stop, strings, top_k_tokens, min_count)
    contexts = _context_lists(stats, start, stop, tokens, strings, n_contexts)
    lenses = _lens_dicts([t[start:stop] for t in lens], strings)
    fires = stats.fires[start:stop]
    max_act = torch.where(fires > 0, stats.max[start:stop], 0.0)
    mean_act = torch.where(fires > 0, stats.act_sum[start:stop] / fires.clamp_min(1), 0.0)
    top_val, top_tok = stats.top_val[start:stop], tokens[stats.top_idx[start:stop].clamp_min(0)]
    sims = simulation[start:stop].tolist() if simulation is not None else [None] * (stop - start)
    columns = zip(range(start, stop), tops, contexts, lenses, stats.density()[start:stop].tolist(),
                  max_act.tolist(), mean_act.tolist(), stats.hist[start:stop].tolist(),
                  concentration_many(top_val, top_tok), token_entropy_many(top_val, top_tok), sims)
    return [{"id": u, "label": label_for(top, ctx), "density": density, "max_act": mx, "mean_act": mean,
             "top_tokens": top, "contexts": ctx, "logit_lens": lens_u, "hist": hist, "score": score,
             "entropy": entropy, "simulation": _finite(sim) if sim is not None else None}
            for u, top, ctx, lens_u, density, mx, mean, hist, score, entropy, sim in columns]


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


def _finite(v) -> float | None:
    v = float(v)
    return None if v != v else round(v, 5)


def interpret(lm: LM, saes: dict[str, SAE], data: str, out: str | Path, *, max_tokens: int = 200_000,
              ctx: int = 256, batch_size: int = 16, top_n: int = 100, window: int = 8, top_k_tokens: int = 10,
              min_count: int = 5, neurons: bool = True, sample: int = 12, seed: int = 0,
              progress: bool = True) -> dict:
    """Stream ``data`` through the model once; write per-unit JSONL, Markdown tables and a summary.

    Returns the summary (also ``interpret.json``): per unit set, the score distribution and counts.
    """
    if not saes:
        raise ScSteerError("interpret: no SAEs given")
    for name, v, lo in (("max_tokens", max_tokens, 1), ("top_n", top_n, 1), ("window", window, 0),
                        ("min_count", min_count, 1), ("top_k_tokens", top_k_tokens, 1), ("batch_size", batch_size, 1),
                        ("ctx", ctx, 2), ("sample", sample, 0)):
        validate.integer(name, v, lo)
    validate.seed("seed", seed)
    lm.check_positions(ctx)
    out = Path(out)
    follow_model(saes, lm)
    sets = unit_sets(lm, saes, neurons)
    sites = sorted({us.site for us in sets}, key=lambda s: s.order)
    vocab = len(lm.tokenizer)
    units = sum(us.n_units for us in sets)   # top lists with their windows, and a batch's activations of each
    check_fits(units * top_n * (2 * window + 2) * 12 + batch_size * ctx * units * 4 * 3,
               f"interpreting {units:,} units with --top-n {top_n:,}, --window {window:,}", lm.device)
    stats = {us.key: UnitStats(us.n_units, vocab, top_n, window, device=lm.device) for us in sets}
    sims = {us.key: Simulation(us.n_units, vocab, device=lm.device) for us in sets}
    all_tokens = []
    rows = iter_rows(iter_documents(data), lm.tokenizer, ctx)
    bar = tqdm(total=max_tokens, unit="tok", desc="interpret", disable=not progress)
    n = 0
    with torch.no_grad():
        for b in iter_batches(rows, batch_size, ctx, pad_token_id(lm.tokenizer)):
            acts = run_sites(lm, b, sites)
            keep = b.keep
            toks = b.input_ids[keep]
            row = b.row[:, None].expand_as(b.input_ids)[keep]
            where = text_rows(b)
            for us in sets:
                h = kept(acts[us.site], where).float()
                f = us.encode(h)
                stats[us.key].update(f, toks, row)
                sims[us.key].update(f, toks, row)
            all_tokens.append(toks)
            n += len(toks)
            bar.update(len(toks))
            if n >= max_tokens:
                break
    bar.close()
    if n == 0:
        raise ScSteerError(f"data {data!r} gave no tokens to interpret")
    tokens = torch.cat(all_tokens)
    strings = token_strings(lm.tokenizer, int(lm.config.vocab_size))
    summary = {"model": lm.name, "data": data, "n_tokens": n, "top_n": top_n, "window": window,
               "min_count": min_count, "sets": {}}
    rng = random.Random(seed)
    for us in sets:
        stats[us.key].cpu()
        recs = unit_records(lm, us, stats[us.key], tokens, strings, top_k_tokens=top_k_tokens, min_count=min_count,
                            simulation=sims[us.key].scores())
        path = rundir.records_path(out, str(us.site), us.kind)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
        live = [r for r in recs if r["density"] > 0]
        picked = sorted(rng.sample(live, min(sample, len(live))), key=lambda r: r["id"])
        atomic_write_text(path.with_suffix(".md"), markdown_table(us, picked))
        summary["sets"][us.key] = {"kind": us.kind, "site": str(us.site), "n_units": us.n_units,
                                   "live": len(live), "file": str(path.relative_to(out)),
                                   "score": summarize([r["score"] for r in recs]),
                                   "entropy": summarize([r["entropy"] for r in recs]),
                                   "simulation": mean_with_ci([r["simulation"] for r in recs])}
    summary["hist_edges_log10"] = HIST_EDGES.tolist()
    atomic_write_text(out / rundir.INTERPRET_JSON, json.dumps(summary, indent=1))
    atomic_write_text(out / rundir.INTERPRET_MD, summary_markdown(summary))
    return summary


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "\\n").replace("`", "'")


def markdown_table(us: UnitSet, records: list[dict]) -> str:
    """The post's table: one row per sampled live unit, its top input tokens."""
    title = f"# {KIND_TITLES[us.kind]} at {us.site}: top input tokens of {len(records)} sampled live units\n\n"
    head = "| Dimension | Label | Density | Top Input Tokens (mean activation) |\n|---|---|---|---|\n"
    rows = "".join(
        f"| {r['id']} | {_cell(r['label'])} | {r['density']:.4f} | "
        + ", ".join(f"`{_cell(t['token'])}` ({t['mean']:.2f})" for t in r["top_tokens"][:8]) + " |\n"
        for r in records)
    return title + head + rows


def summary_markdown(summary: dict) -> str:
    lines = ["# Interpretability: SAE features against neurons\n",
             f"{summary['n_tokens']:,} tokens of `{summary['data']}`; score = share of the top-{summary['top_n']} "
             "activation mass on the unit's 5 heaviest token ids (see sc_steer/interpret/score.py).\n",
             "| units | site | n | live | scored | score mean | median | p25-p75 | share >= 0.8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary["sets"].values():
        sc = s["score"]
        if sc["n"]:
            lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | {s['n_units']} | {s['live']} | {sc['n']} "
                         f"| {sc['mean']:.3f} | {sc['median']:.3f} | {sc['p25']:.3f}-{sc['p75']:.3f} "
                         f"| {100 * sc['share_above_0.8']:.1f}% |")
        else:
            lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | {s['n_units']} | {s['live']} | 0 | - | - | - | - |")
    lines += ["", "## Simulation score\n",
              "Each unit's mean activation per token id on even text rows (its explanation) predicts its "
              "activations on odd rows; score = Pearson correlation of predicted and true activations over "
              "the held-out positions (see sc_steer/interpret/simulation.py). Mean over units with a 95% "
              "confidence interval.\n",
              "| units | site | scored | mean | 95% CI | median |", "|---|---|---|---|---|---|"]
    for s in summary["sets"].values():
        sim = s.get("simulation", {"n": 0})
        if sim["n"]:
            lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | {sim['n']} | {sim['mean']:.3f} "
                         f"| {sim['ci95'][0]:.3f}-{sim['ci95'][1]:.3f} | {sim['median']:.3f} |")
        else:
            lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | 0 | - | - | - |")
    return "\n".join(lines) + "\n"


def load_unit(out: str | Path, site: str, unit: int, kind: str = "sae") -> dict:
    """One unit's record from an interpretation folder; clear errors for missing files and ids."""
    return rundir.read_record(out, site, unit, kind)
