"""Interpret every unit of every layer in one streaming pass: SAE features and the neuron baselines.

For each SAE site, three unit sets are read over the same tokens: the SAE's features, the raw
residual dimensions at that site, and the MLP neurons of that layer (``mlp_act``). Results per unit
(one JSON line each, ``readout.py``): label, density, max and mean activation, histogram, top input
tokens, top contexts with per-token activations, logit lens, the concentration score, and the
explanation scores with the explanations themselves (``explain.py``).

The text's rows alternate between two halves (even rows explain, odd rows are held out); the pass
reads the explaining half first, then the held-out half, so that what the held-out half is judged
against is known when it arrives.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .. import rundir, validate
from ..activations import kept, run_sites, text_rows
from ..data import Row, collate, iter_documents, iter_rows, pad_token_id
from ..devices import check_fits, follow_model, release_host_memory
from ..errors import ScSteerError
from ..files import atomic_write_text, to_json
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .explain import K_VALUES, Explanations, pair_vocabulary
from .readout import N_CONTEXTS, token_strings, unit_records
from .report import markdown_table, mean_with_ci, summary_markdown
from .score import summarize
from .stats import HIST_EDGES, UnitStats
from .tokens import DENSE_TOKEN_TABLE_LIMIT, Nonzeros


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


TABLE_BUDGET = 1 << 29   # bytes of dense per-token tables one pass over the text may hold (512 MiB)


def passes(sets: list[UnitSet], vocab: int, n_pairs: int, budget: int = TABLE_BUDGET) -> list[list[UnitSet]]:
    """The unit sets split into passes over the text, a layer's sets always together, in forward order,
    each pass's dense explanation tables (``Explanations``: two token and two pair tables per unit)
    within ``budget`` bytes where one layer alone fits. More passes cost more forward passes (each
    stops at its last layer) and bound the memory."""
    per_unit = 2 * (vocab + n_pairs) * 4
    layers: dict[int, list[UnitSet]] = {}
    for us in sets:
        layers.setdefault(us.site.layer, []).append(us)
    out: list[list[UnitSet]] = []
    held = 0
    for layer in sorted(layers):
        group = layers[layer]
        size = sum(us.n_units * per_unit for us in group if us.n_units * vocab <= DENSE_TOKEN_TABLE_LIMIT)
        if out and held + size <= budget:
            out[-1] += group
            held += size
        else:
            out.append(list(group))
            held = size
    return out


def interpret(lm: LM, saes: dict[str, SAE], data: str, out: str | Path, *, max_tokens: int = 200_000,
              ctx: int = 256, batch_size: int = 16, top_n: int = 100, window: int = 8, top_k_tokens: int = 10,
              min_count: int = 5, neurons: bool = True, sample: int = 12, seed: int = 0,
              table_budget: int = TABLE_BUDGET, progress: bool = True) -> dict:
    """Stream ``data`` through the model (one pass per group of layers, ``passes``); write per-unit
    JSONL, Markdown tables and a summary.

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
    vocab = len(lm.tokenizer)
    units = sum(us.n_units for us in sets)   # top lists with their windows, and a batch's activations of each
    check_fits(units * (top_n * 12 + N_CONTEXTS * (2 * window + 1) * 12) + batch_size * ctx * units * 4 * 3,
               f"interpreting {units:,} units with --top-n {top_n:,}, --window {window:,}", lm.device)
    rows = rows_upto(data, lm.tokenizer, ctx, max_tokens)
    halves = [[(i, r) for i, r in enumerate(rows) if i % 2 == held] for held in (0, 1)]
    ev_prev, ev_tok = (torch.cat(t) for t in zip(*(_text_tokens(r) for _, r in halves[0]))) if halves[0] \
        else (torch.zeros(0, dtype=torch.long),) * 2
    pair_keys = pair_vocabulary(ev_prev, ev_tok, vocab)
    n = sum(sum(r.keep) for r in rows)
    if n == 0:
        raise ScSteerError(f"data {data!r} gave no tokens to interpret")
    groups = passes(sets, vocab, len(pair_keys), table_budget)
    strings = token_strings(lm.tokenizer, int(lm.config.vocab_size))
    summary = {"model": lm.name, "data": data, "n_tokens": n, "top_n": top_n, "window": window,
               "min_count": min_count, "n_pairs": len(pair_keys), "passes": len(groups), "sets": {}}
    rng = random.Random(seed)
    desc = "interpret" + (f" ({len(groups)} passes)" if len(groups) > 1 else "")
    bar = tqdm(total=n * len(groups), unit="tok", desc=desc, disable=not progress)
    for group in groups:
        stats, expl, tokens = _read(lm, group, rows, halves, pair_keys, vocab, top_n, window, batch_size, ctx, bar)
        for us in group:
            recs = unit_records(lm, us.kind, us.site, us.sae, stats.pop(us.key), tokens, strings,
                                top_k_tokens=top_k_tokens, min_count=min_count, explanations=expl.pop(us.key))
            summary["sets"][us.key] = _write_set(out, us, recs, rng, sample)
        del stats, expl
        release_host_memory(collect=True)
    bar.close()
    summary["sets"] = {us.key: summary["sets"][us.key] for us in sets}   # the order of unit_sets
    summary["hist_edges_log10"] = HIST_EDGES.tolist()
    atomic_write_text(out / rundir.INTERPRET_JSON, to_json(summary, indent=1))
    atomic_write_text(out / rundir.INTERPRET_MD, summary_markdown(summary))
    return summary


def _read(lm: LM, group: list[UnitSet], rows: list[Row], halves: list, pair_keys: torch.Tensor, vocab: int,
          top_n: int, window: int, batch_size: int, ctx: int, bar) -> tuple[dict, dict, torch.Tensor]:
    """One pass over the text for ``group``'s unit sets: the explaining half, then the held-out half.
    Returns their statistics and explanation sums (top lists renumbered to reading order) and the
    text's tokens in reading order."""
    sites = sorted({us.site for us in group}, key=lambda s: s.order)
    expl = {us.key: Explanations(us.n_units, vocab, pair_keys, device=lm.device) for us in group}
    stats = {us.key: UnitStats(us.n_units, vocab, top_n, window, device=lm.device, windows=N_CONTEXTS,
                               token_sums=expl[us.key].all_tokens) for us in group}
    all_tokens, order = [], []     # the tokens as read, and where each stands in the text
    starts = torch.tensor([0] + [sum(r.keep) for r in rows]).cumsum(0)
    pad = pad_token_id(lm.tokenizer)
    with torch.no_grad():
        for held, half in enumerate(halves):
            for i in range(0, len(half), batch_size):
                part = half[i:i + batch_size]
                b = replace(collate([r for _, r in part], 0, ctx, pad), row=torch.tensor([j for j, _ in part]))
                acts = run_sites(lm, b, sites)
                keep = b.keep
                toks = b.input_ids[keep]
                prev = torch.cat([torch.full_like(b.input_ids[:, :1], -1), b.input_ids[:, :-1]], 1)[keep]
                row = b.row[:, None].expand_as(b.input_ids)[keep]
                where = text_rows(b)
                for us in group:
                    f = us.encode(kept(acts[us.site], where).float())
                    # SAE features on the CPU are read by their nonzeros (on a GPU the dense reading
                    # needs no host sync, and finding nonzeros would add one per batch)
                    nz = Nonzeros.of(f) if us.kind == "sae" and f.device.type == "cpu" else None
                    stats[us.key].update(f, toks, row, nz)
                    expl[us.key].update(f, toks, prev, bool(held), nz)
                all_tokens.append(toks)
                order += [torch.arange(starts[j], starts[j + 1]) for j, _ in part]
                bar.update(len(toks))
    # positions in reading order, so that a context's token_index is where it stands in the text
    order = torch.cat(order)
    tokens = torch.empty_like(order).index_copy_(0, order, torch.cat(all_tokens))
    for st in stats.values():
        st.cpu().renumber(order)
    return stats, expl, tokens


def _write_set(out: Path, us: UnitSet, recs: list[dict], rng: random.Random, sample: int) -> dict:
    """A unit set's JSONL records and sampled Markdown table; returns its summary entry."""
    path = rundir.records_path(out, str(us.site), us.kind)
    atomic_write_text(path, "".join(to_json(r) + "\n" for r in recs))
    live = [r for r in recs if r["density"] > 0]
    picked = sorted(rng.sample(live, min(sample, len(live))), key=lambda r: r["id"])
    atomic_write_text(path.with_suffix(".md"), markdown_table(us.kind, us.site, picked))
    return {"kind": us.kind, "site": str(us.site), "n_units": us.n_units, "live": len(live),
            "file": str(path.relative_to(out)), "score": summarize([r["score"] for r in recs]),
            "entropy": summarize([r["entropy"] for r in recs]),
            "explain": {name: {k: mean_with_ci([r["scores"][name][k] for r in recs])
                               for k in [*map(str, K_VALUES), "all"]} for name in ("tokens", "context")},
            "sensitivity": mean_with_ci([r["sensitivity"] for r in recs]),
            "specificity": mean_with_ci([r["specificity"] for r in recs]),
            "context_labels": sum(" (after " in r["label"] for r in recs)}


def rows_upto(data: str, tokenizer, ctx: int, max_tokens: int) -> list[Row]:
    """The text's rows, in order, until they hold ``max_tokens`` text tokens (the row that reaches it
    included)."""
    rows, n = [], 0
    for r in iter_rows(iter_documents(data), tokenizer, ctx):
        rows.append(r)
        n += sum(r.keep)
        if n >= max_tokens:
            break
    return rows


def _text_tokens(r: Row) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's text tokens and the token before each (-1 where there is none)."""
    ids = torch.tensor(r.ids)
    prev = torch.cat([torch.tensor([-1]), ids[:-1]])
    keep = torch.tensor(r.keep)
    return prev[keep], ids[keep]


def load_unit(out: str | Path, site: str, unit: int, kind: str = "sae") -> dict:
    """One unit's record from an interpretation folder; clear errors for missing files and ids."""
    return rundir.read_record(out, site, unit, kind)
