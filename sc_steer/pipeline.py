"""The stages that work on a run folder (``rundir.py``): train -> eval -> interpret -> graph, each
reading the last one's output from the folder (``demo/run.py`` runs them all on the demo model).

Each stage opens what it needs from the run (the model, the SAEs, the interpretation records) and
calls the library function that does the work on a model and SAEs in memory; the CLI calls the
stages.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import rundir, validate
from .data import data_fingerprint
from .devices import resolve_device
from .distributed import LOCAL, Dist, share
from .errors import ScSteerError
from .evaluate import evaluate_saes, write_results
from .files import atomic_write_text, file_sha256, read_json, to_json
from .graph.faithfulness import metric_of
from .graph.prompt_run import prompt_feature_graph
from .graph.run import check_options, feature_graph, source_layers
from .interpret import interpret, write_browser, write_plots
from .interpret.probe import labelled_texts, sparse_probe
from .interpret.report import probe_markdown
from .models import LM
from .rundir import load_run_saes, open_run_model, start_run
from .sae import SAE
from .sae.base import WEIGHTS_FILE
from .sae.config import TrainConfig
from .sae.sources import model_source, store_source
from .sae.train import PARALLEL_MODES, Trainer
from .sites import parse_sites
from .store import ActivationStore


def check_parallel(parallel: str | None, dist: Dist, n_sites: int) -> None:
    """A run split over several processes needs its split named, and enough sites to go round."""
    if parallel is not None and parallel not in PARALLEL_MODES:
        raise ScSteerError(f"--parallel {parallel!r}: expected layers or data")
    if dist.active and parallel is None:
        raise ScSteerError(f"{dist.world} processes were started (torchrun): choose how they share the work with "
                           "--parallel layers (sites across ranks) or --parallel data (batches across ranks)")
    if dist.active and parallel == "layers" and n_sites < dist.world:
        raise ScSteerError(f"--parallel layers with {dist.world} processes needs at least {dist.world} sites "
                           f"(this run has {n_sites}); start fewer processes or use --parallel data")


def train_from_store(activations: str | Path, cfg: TrainConfig, out: str | Path, *, resume: bool = False,
                     device: str | torch.device = "cpu", force: bool = False, progress: bool = True,
                     dist: Dist = LOCAL, parallel: str | None = None) -> dict[str, SAE]:
    """Train one SAE per requested site from an activation collection on disk, on ``device``; under
    torchrun, ``dist`` and ``parallel`` split the run (``sae/train.py``). Returns this rank's SAEs."""
    device = resolve_device(device)  # before anything is written
    store = ActivationStore(activations)
    sites = [str(s) for s in parse_sites(cfg.sites, store.manifest["model"]["n_layers"])]
    for s in sites:
        store.d(s)  # checks the site was collected
    store.check_batch_size(cfg.batch_size)
    info = {s: {"d": store.d(s), "mean_norm": store.mean_norm(s), "module": store.manifest["sites"][s].get("module")}
            for s in sites}
    cfg.check_widths({s: v["d"] for s, v in info.items()}, device)
    check_parallel(parallel, dist, len(sites))
    c = store.manifest["config"]
    meta = {"model_name": store.manifest["model"]["name"], "context_size": c["ctx"], "prepend_bos": c["prepend_bos"],
            "dataset": c["data"]}
    run_info = {"model": meta["model_name"], "activations": str(activations),
                "dataset": {"sha256": store.manifest["dataset"]["sha256"], "n_tokens": store.n_tokens,
                            "collection": store.manifest["config"]},
                "sites": sites, "train_config": cfg.to_dict()}
    dist.agree(run_info, "the training settings")
    dist.main_first(lambda: start_run(Path(out), run_info, force=force), "writing run.json")
    mine = share(sites, dist) if dist.active and parallel == "layers" else sites
    trainer = Trainer(cfg, store_source(store, mine, cfg.batch_size, cfg.seed), out, info, meta, device, progress,
                      dist=dist, parallel=parallel)
    return trainer.run(resume=resume)


def train_from_model(lm: LM, data: str, cfg: TrainConfig, out: str | Path, *, ctx: int = 256, resume: bool = False,
                     device: str | torch.device = "cpu", force: bool = False, progress: bool = True,
                     dist: Dist = LOCAL, parallel: str | None = None, buffer_tokens: int = 1 << 17,
                     buffer_dtype: torch.dtype | None = None) -> dict[str, SAE]:
    """Train straight from the model's activations, with no disk cache, shuffled in a host buffer of
    ``buffer_tokens`` tokens per site in ``buffer_dtype`` (``sources.model_source``). Under torchrun only
    ``parallel="layers"``: each rank runs its own copy of the model for its share of the sites."""
    sites = lm.sites(cfg.sites)
    validate.integer("--ctx", ctx, 2)
    lm.check_positions(ctx)
    info = {str(s): {"d": lm.width(s), "module": lm.module_path(s)} for s in sites}
    cfg.check_widths({s: v["d"] for s, v in info.items()}, resolve_device(device))
    check_parallel(parallel, dist, len(sites))
    if dist.active and parallel == "data":
        raise ScSteerError("--parallel data trains from an activation collection (--activations): collect first "
                           "(sc-steer collect runs under torchrun too), or use --parallel layers to train from "
                           "the model")
    meta = {"model_name": lm.name, "context_size": ctx, "prepend_bos": True, "dataset": data}
    run_info = {"model": lm.name, "data": data, "dataset": {"sha256": data_fingerprint(data), "ctx": ctx},
                "sites": list(info), "train_config": cfg.to_dict()}
    dist.agree(run_info, "the training settings")
    dist.main_first(lambda: start_run(Path(out), run_info, force=force), "writing run.json")
    mine = share(sites, dist) if dist.active else sites
    source = model_source(lm, mine, data, cfg.batch_size, cfg.seed, ctx=ctx, run_sites_of=sites,
                          buffer_tokens=buffer_tokens, buffer_dtype=buffer_dtype)
    return Trainer(cfg, source, out, info, meta, device, progress, dist=dist, parallel=parallel).run(resume=resume)


def eval_run(run: str | Path, data: str = "demo:heldout", *, lm: LM | None = None, max_tokens: int = 50_000,
             batch_size: int = 8, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
             progress: bool = True) -> dict[str, dict]:
    """Evaluate a run's SAEs on held-out text; writes eval.json and eval.md into the run.

    The model is ``lm``, or the run's own opened on ``device`` in ``dtype``."""
    lm = open_run_model(run, lm, device=device, dtype=dtype)
    saes = load_run_saes(run, device=lm.device)
    ctx = next(iter(saes.values())).cfg.context_size or 256
    t = time.time()
    results = evaluate_saes(lm, saes, data, ctx=ctx, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    write_results(results, run, {"model": lm.name, "data": data, "max_tokens": max_tokens,
                                 "seconds": round(time.time() - t, 1)})
    return results


def interpret_run(run: str | Path, data: str = "demo:heldout", *, lm: LM | None = None, max_tokens: int = 200_000,
                  sites: list[str] | None = None, neurons: bool = True, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = "float32", progress: bool = True, **options) -> dict:
    """Interpret a run's SAEs (and the neuron baselines): JSONL, Markdown, browser and plots in the run.

    The model is ``lm``, or the run's own opened on ``device`` in ``dtype``."""
    lm = open_run_model(run, lm, device=device, dtype=dtype)
    saes = load_run_saes(run, sites, device=lm.device)
    ctx = next(iter(saes.values())).cfg.context_size or 256
    summary = interpret(lm, saes, data, run, max_tokens=max_tokens, ctx=ctx, neurons=neurons, progress=progress,
                        **options)
    write_browser(run, summary)
    write_plots(run, summary)
    return summary


def probe_run(run: str | Path, data: str = "demo:heldout", label: str = "source", *, field: str = "text",
              lm: LM | None = None, max_per_label: int = 500, ctx: int = 128, neurons: bool = True, seed: int = 0,
              device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", progress: bool = True) -> dict:
    """Sparse probing of a run's SAE features and neuron baselines for one label (``interpret/probe.py``);
    adds the label's results to the run's probe.json and probe.md (other labels there are kept)."""
    items = labelled_texts(data, label, field, max_per_label, seed)
    validate.integer("--ctx", ctx, 2)
    lm = open_run_model(run, lm, device=device, dtype=dtype)
    lm.check_positions(ctx)
    saes = load_run_saes(run, device=lm.device)
    sets = sparse_probe(lm, saes, items, ctx=ctx, neurons=neurons, seed=seed, progress=progress)
    path = Path(run) / rundir.PROBE_JSON
    probes = read_json(path, "the run's probe results") if path.exists() else {}
    counts: dict[str, int] = {}
    for _, lab in items:
        counts[lab] = counts.get(lab, 0) + 1
    probes[label] = {"data": data, "field": field, "n_texts": len(items), "labels": dict(sorted(counts.items())),
                     "sets": sets}
    atomic_write_text(path, to_json(probes, indent=1))
    atomic_write_text(Path(run) / rundir.PROBE_MD, probe_markdown(probes))
    return probes[label]


def graph_run(run: str | Path, prompts: str, out: str | Path, *, lm: LM | None = None, layers: list[int] | None = None,
              sources: str | list[int] = "active", mode: str = "zero", value: float | None = None,
              where: str = "all", prune: str | None = None, amount: float | None = None, rank_by: str = "weight",
              attribute: bool = True, ctx: int = 64, max_prompts: int = 64, name: str = "graph",
              device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", force: bool = False,
              progress: bool = True, prompt: str | None = None, edge_amount: float = 0.98, n_logits: int = 10,
              logit_diff: tuple[str, str] | None = None, **options):
    """The feature graph of a run's resid_post SAEs over ``layers`` (``graph/run.py``), labelled with the
    run's interpretation records, written to ``out`` with its recipe. With ``prompt`` it is that one
    prompt's graph instead (``graph/prompt_run.py``: positions kept, down to the logits; ``layers`` are
    then the graph's layers, default all; ``prompts`` and the ablation options are not used).

    ``prune``/``amount`` default to top_k 5 (averaged) or influence 0.8 (per prompt). The model is
    ``lm``, or the run's own opened on ``device`` in ``dtype``. ``out`` must be new, empty, or hold the
    graph of this same recipe; ``force=True`` replaces another graph there."""
    run, out = Path(run), Path(out)
    prune = prune or ("influence" if prompt is not None else "top_k")
    amount = amount if amount is not None else (0.8 if prompt is not None else 5)
    check_options(layers=layers, sources=sources, mode=mode, value=value, where=where, prune=prune, amount=amount,
                  rank_by=rank_by, ctx=ctx, max_prompts=max_prompts, name=name, prompt=prompt,
                  edge_amount=edge_amount, n_logits=n_logits)
    if prompt is not None:
        recipe = {"run": str(run), "prompt": prompt, "layers": layers, "prune": prune, "amount": amount,
                  "edge_amount": edge_amount, "n_logits": n_logits, "ctx": ctx, "name": name, "logit_diff": logit_diff}
    else:
        recipe = {"run": str(run), "layers": layers, "sources": sources, "mode": mode, "value": value, "where": where,
                  "prune": prune, "amount": amount, "rank_by": rank_by, "ctx": ctx, "max_prompts": max_prompts,
                  "prompts": prompts, "name": name, **({"logit_diff": logit_diff} if logit_diff else {})}
    identity = {k: v for k, v in recipe.items() if not (k == "layers" and v is None)}   # None: whatever it had
    rundir.claim_folder(out, rundir.GRAPH_RECIPE, identity, kind="graph", force=force)
    lm = open_run_model(run, lm, device=device, dtype=dtype)
    metric = metric_of(lm, logit_diff)
    if prompt is not None:
        if layers is None:
            layers = [int(s.split(".")[1]) for s in rundir.sae_sites(run) if s.startswith("resid_post.")]
        needed = sorted(layers)
    else:
        layers = source_layers(lm, layers)
        needed = sorted({n for n in layers} | {n + 1 for n in layers})
    saes = load_run_saes(run, [f"resid_post.{n}" for n in needed], device=lm.device)
    hashes = {s: file_sha256(rundir.sae_dir(run, s) / WEIGHTS_FILE) for s in saes}
    labels = {n: rundir.read_records(run, f"resid_post.{n}") for n in needed}
    if prompt is not None:
        corr = {}
        g, paths = prompt_feature_graph(lm, saes, prompt, out, layers=needed, prune=prune, amount=amount,
                                        edge_amount=edge_amount, n_logits=n_logits, ctx=ctx, metric=metric, name=name,
                                        labels=labels, provenance={"sae_sha256": hashes}, progress=progress, **options)
    else:
        g, paths, corr = feature_graph(lm, saes, prompts, out, layers=layers, sources=sources, mode=mode, value=value,
                                       where=where, prune=prune, amount=amount, rank_by=rank_by, attribute=attribute,
                                       ctx=ctx, max_prompts=max_prompts, name=name, labels=labels, metric=metric,
                                       provenance={"sae_sha256": hashes}, progress=progress, **options)
    scores = {k: g.graph[k] for k in ("faithfulness", "completeness", "metric_at") if k in g.graph}
    if "metric" in g.graph:
        scores["metric"] = json.loads(g.graph["metric"])
    atomic_write_text(out / rundir.GRAPH_RECIPE, to_json({**recipe, "layers": layers, "scores": scores}, indent=1))
    return g, paths, corr
