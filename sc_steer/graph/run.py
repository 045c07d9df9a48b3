"""The feature graph of a set of SAEs: choose sources, measure effects layer by layer, prune, annotate,
export (``pipeline.graph_run`` is the stage that runs it on a run folder)."""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import validate
from ..data import iter_batches, iter_documents, iter_rows, pad_token_id
from ..errors import ScSteerError
from ..files import atomic_write
from ..models import LM
from ..sae import SAE
from .attribution import attribution, pearson
from .build import build_graph
from .export import FORMATS, export_graph
from .faithfulness import attach_scores
from .measure import PairEffects, measure_pair, source_means


def prompt_batches(lm: LM, prompts: str, *, ctx: int = 64, batch_size: int = 8, max_prompts: int = 64,
                   split: str = "line") -> tuple[list, str]:
    """Prompts from a data spec (a .txt file is one prompt per line; longer documents are cut to their
    first ``ctx`` tokens); returns batches and a content hash."""
    docs = []
    for d in iter_documents(prompts, split=split):
        docs.append(d)
        if len(docs) >= max_prompts:
            break
    firsts, seen = [], set()
    for row in iter_rows(docs, lm.tokenizer, ctx):  # a prompt is one row: the first ctx tokens of a document
        d = next(x for x in row.doc if x >= 0)
        if d not in seen:
            seen.add(d)
            firsts.append(row)
    batches = list(iter_batches(firsts, batch_size, ctx, pad_token_id(lm.tokenizer)))
    if not batches or sum(int(b.keep.sum()) for b in batches) == 0:
        raise ScSteerError(f"prompt set {prompts!r} is empty")
    return batches, hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]


def choose_sources(lm: LM, layer: int, sae: SAE, next_sae: SAE, batches: list, spec: str | list[int],
                   **ablation) -> torch.Tensor:
    """``active`` (all that fire on the prompts), ``top:N`` (by activation mass), ``attr:N`` (by gradient
    attribution to all of layer n+1, for the ablation ``mode``/``value``/``where`` given) or explicit ids."""
    means, fires = source_means(lm, layer, sae, batches)
    active = torch.nonzero(fires > 0)[:, 0]
    if isinstance(spec, (list, tuple)):
        return torch.tensor(spec, dtype=torch.long)
    if spec == "active":
        return active
    kind, _, n = spec.partition(":")
    if kind not in ("top", "attr") or not n.isdigit() or int(n) < 1:
        raise ScSteerError(f"sources {spec!r}: expected active, top:N, attr:N or a list of feature ids")
    n = min(int(n), len(active))
    if kind == "top":
        return active[means[active].topk(n).indices].sort().values
    score = attribution(lm, layer, sae, next_sae, batches, active, means=means, **ablation)[:, 0].abs()
    return active[score.topk(n).indices].sort().values


def check_model(lm: LM, saes: dict[str, SAE], ctx: int) -> None:
    """The SAEs were trained on this model (where their files name one), and it reads ``ctx`` positions."""
    for s, sae in saes.items():
        if sae.cfg.model_name and sae.cfg.model_name != lm.name:
            raise ScSteerError(f"the SAE for {s} was trained on model {sae.cfg.model_name!r}, not {lm.name!r}")
    lm.check_positions(ctx)


def source_layers(lm: LM, layers: list[int] | None) -> list[int]:
    """The source layers of a graph (default: every layer with a next one), checked against the model."""
    layers = list(range(lm.n_layers - 1)) if layers is None else list(layers)
    for n in layers:
        if not 0 <= n < lm.n_layers - 1:
            raise ScSteerError(f"source layer {n}: needs a next layer; use 0-{lm.n_layers - 2}")
    return layers


def feature_graph(lm: LM, saes: dict[str, SAE], prompts: str, out: str | Path, *, layers: list[int] | None = None,
                  sources: str | list[int] = "active", mode: str = "zero", value: float | None = None,
                  where: str = "all", prune: str = "top_k", amount: float = 5, rank_by: str = "weight",
                  attribute: bool = True, ctx: int = 64, max_prompts: int = 64, chunk: int = 16,
                  formats: tuple[str, ...] = FORMATS, name: str = "graph", labels: dict[int, list[dict] | None] = None,
                  provenance: dict | None = None, progress: bool = True, curve: tuple[float, ...] = (),
                  metric="next_token"):
    """Measure, prune and export the feature graph of ``saes`` (``resid_post.{n}`` for each source layer n
    and n + 1) into ``out``: the exports and ``effects_L{n}.safetensors``. ``labels[n]`` are layer n's
    interpretation records, ``provenance`` goes into the graph's attributes; ``curve`` (pruning amounts)
    adds ``faithfulness.png`` and the graph attribute ``faithfulness_curve``: the circuit scores of the
    same measurement pruned at each amount; ``metric`` is what they score ("next_token", or
    ``faithfulness.metric_of``'s logit difference). Returns the graph, the export paths and the
    attribution-vs-exact Pearson correlation per layer."""
    layers = source_layers(lm, layers)
    check_model(lm, saes, ctx)
    out = Path(out)
    batches, prompt_hash = prompt_batches(lm, prompts, ctx=ctx, max_prompts=max_prompts)
    pairs: list[PairEffects] = []
    attrs: dict[int, torch.Tensor] = {}
    corr: dict[str, float] = {}
    timings = {}
    for n in layers:
        a, b = saes[f"resid_post.{n}"], saes[f"resid_post.{n + 1}"]
        t = time.time()
        src = choose_sources(lm, n, a, b, batches, sources, mode=mode, value=value, where=where)
        pair = measure_pair(lm, n, a, b, batches, src, mode=mode, value=value, where=where, chunk=chunk)
        timings[f"L{n}"] = round(time.time() - t, 2)
        pairs.append(pair)
        if progress:
            print(f"layer {n} -> {n + 1}: {len(src)} sources x {b.cfg.d_sae} targets over {pair.count} positions "
                  f"in {timings[f'L{n}']:.1f} s")
        if attribute:
            kept_targets = torch.nonzero((pair.weight.abs() > 0).any(0))[:, 0]
            strongest = pair.weight.abs().amax(0)[kept_targets].topk(min(64, len(kept_targets))).indices
            targets = kept_targets[strongest]
            attr = attribution(lm, n, a, b, batches, src, targets, mode=mode, value=value, where=where)
            full = torch.full_like(pair.effect, float("nan"))
            full[:, targets] = attr
            attrs[n] = full
            corr[f"L{n}"] = pearson(attr, pair.effect[:, targets])
        effects = {"sources": pair.sources, "effect": pair.effect.contiguous(), "effect_std": pair.effect_std,
                   "pre_delta": pair.pre_delta, "skip": pair.skip, "clean_mean": pair.clean_mean,
                   "source_mean": pair.source_mean}
        atomic_write(out / f"effects_L{n}.safetensors", lambda p, t=effects: save_file(t, str(p)))
    provenance = {"model": lm.name, "prompts": prompts, "prompt_sha256": prompt_hash, **(provenance or {}),
                  "config": {"layers": layers, "sources": sources, "mode": mode, "value": value, "where": where,
                             "prune": prune, "amount": amount, "rank_by": rank_by, "ctx": ctx,
                             "max_prompts": max_prompts},
                  "attribution_pearson": corr, "seconds_per_layer": timings}
    g = build_graph(pairs, prune=prune, amount=amount, rank_by=rank_by, nodes=labels, provenance=provenance,
                    attribution=attrs or None)
    curves = {float(a): build_graph(pairs, prune=prune, amount=float(a), rank_by=rank_by) for a in curve}
    attach_scores(lm, saes, batches, g, metric=metric, curve=curves, out=out, prune=prune, progress=progress)
    paths = export_graph(g, out, name, formats, title=f"{lm.name}: feature graph, layers {layers[0]}-{layers[-1] + 1}")
    return g, paths, corr


def check_options(*, layers, sources, mode, value, where, prune, amount, rank_by, ctx, max_prompts, name,
                  prompt=None, edge_amount=0.98, n_logits=10) -> None:
    """The graph options, checked before any work (names as the CLI flags)."""
    from .build import PRUNE, RANK_BY
    from .measure import MODES, WHERE
    from .prompt_build import PROMPT_PRUNE

    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ScSteerError(f"--layers {layers!r}: expected a non-empty list of source layers")
        for n in layers:
            validate.integer("--layers", n, 0)
    if isinstance(sources, (list, tuple)):
        if not sources:
            raise ScSteerError("--sources: the list of feature ids is empty")
        for i in sources:
            validate.integer("--sources", i, 0)
    elif not isinstance(sources, str):
        raise ScSteerError(f"--sources {sources!r}: expected active, top:N, attr:N or a list of feature ids")
    validate.choice("--mode", mode, MODES)
    if mode == "clamp":
        if value is None:
            raise ScSteerError("--mode clamp needs --value (the value the source feature is clamped to)")
        validate.number("--value", value)
    validate.choice("--where", where, WHERE)
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ScSteerError("--prompt: expected a non-empty text")
        validate.choice("--prune", prune, PROMPT_PRUNE)
        validate.number("--edge-amount", edge_amount, 0, 1, lo_open=True)
        validate.integer("--logits", n_logits, 1)
    else:
        if prune == "influence":
            raise ScSteerError("--prune influence needs --prompt (influence on the logits is per prompt); "
                               f"an averaged graph prunes by {', '.join(PRUNE)}")
        validate.choice("--prune", prune, PRUNE)
    if prune == "top_k":
        validate.number("--amount", amount, 1)
    else:
        validate.number("--amount", amount, 0, 1, lo_open=True)
    validate.choice("--rank-by", rank_by, RANK_BY)
    validate.integer("--ctx", ctx, 2)
    validate.integer("--max-prompts", max_prompts, 1)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ScSteerError(f"--name {name!r}: expected a plain file name (letters, digits, '_', '-', '.'), "
                           "the exports are written as OUT/NAME.<format>")
