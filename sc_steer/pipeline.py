"""The run directory ties the stages together: collect -> train -> eval, each reading the last one's output.

    runs/<name>/
      run.json                    model, data, sites, training config
      activations/                the activation collection (manifest.json + shards/)
      saes/<site>/                cfg.json + sae_weights.safetensors (+ sparsity.safetensors), SAELens layout
      checkpoint.safetensors      the trainer's resumable state
      train_log.jsonl, training_curves.png
      eval.json, eval.md          per-site metrics on held-out text
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .activations import ActivationStore, collect
from . import validate
from .data import data_fingerprint
from .devices import resolve_device
from .distributed import LOCAL, Dist, share
from .errors import ScSteerError
from .files import atomic_write_text, check_folder, make_dir
from .models import LM, open_model
from .sae import SAE, load_sae
from .sae.config import TrainConfig
from .sae.metrics import evaluate_saes, write_results
from .sae.train import PARALLEL_MODES, Trainer, model_source, store_source


# what makes two trainings the same run: a folder is only ever continued by the run that made it
RUN_IDENTITY = ("model", "dataset", "sites", "train_config")


def start_run(run: Path, info: dict, *, force: bool = False) -> None:
    """Claim ``run`` for a training described by ``info`` and write its run.json.

    The folder must be new, or hold this same run (``RUN_IDENTITY``: model, data fingerprint, sites,
    config), so that a resume continues it and nothing foreign is mixed in. ``force=True`` starts
    over: the old run's checkpoint, log and SAEs go first, so the folder never pairs this run.json
    with another run's SAEs.
    """
    check_run(run, info, force=force)
    if force:
        for name in ("checkpoint.safetensors", "train_log.jsonl", "run.json"):
            (run / name).unlink(missing_ok=True)
        shutil.rmtree(run / "saes", ignore_errors=True)
    make_dir(run)
    atomic_write_text(run / "run.json", json.dumps(info, indent=1))


def check_run(run: Path, info: dict, *, force: bool = False) -> None:
    """Whether ``run`` may hold the run described by ``info`` (compared on the identity keys it has);
    writes nothing. The run's own activation collection may already be inside it (as the demo's is)."""
    check_folder(run)
    own = Path(info["activations"]).resolve() if info.get("activations") else None
    path = run / "run.json"
    if path.exists() and not force:
        old = read_run(run)
        new = json.loads(json.dumps(info))
        differs = [k for k in RUN_IDENTITY if k in new and old.get(k) != new[k]]
        if differs:
            raise ScSteerError(f"--out {str(run)!r} holds another run (its {', '.join(differs)} differ); choose "
                               "another --out, or pass --force to start over there")
    elif not path.exists() and not force and run.is_dir() and any(p.resolve() != own for p in run.iterdir()):
        raise ScSteerError(f"--out {str(run)!r} is not empty and is not an sc-steer run; choose another --out, "
                           "or pass --force to train there anyway")


def read_run(run: str | Path) -> dict:
    path = Path(run) / "run.json"
    if not path.exists():
        raise ScSteerError(f"{str(run)!r} is not an sc-steer run (no run.json)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScSteerError(f"{str(path)!r} is unreadable ({e}); it should be the JSON sc-steer train wrote") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), str) or not info["model"]:
        raise ScSteerError(f"{str(path)!r} does not name the run's model (expected a JSON object with \"model\")")
    return info


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
    from .sites import parse_sites

    sites = [str(s) for s in parse_sites(cfg.sites, store.manifest["model"]["n_layers"])]
    for s in sites:
        store.d(s)  # checks the site was collected
    store.check_batch_size(cfg.batch_size)
    info = {s: {"d": store.d(s), "mean_norm": store.mean_norm(s), "module": store.manifest["sites"][s].get("module")}
            for s in sites}
    cfg.check_widths({s: v["d"] for s, v in info.items()})
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
                     dist: Dist = LOCAL, parallel: str | None = None) -> dict[str, SAE]:
    """Train straight from the model's activations, with no disk cache. Under torchrun only
    ``parallel="layers"``: each rank runs its own copy of the model for its share of the sites."""
    sites = lm.sites(cfg.sites)
    validate.integer("--ctx", ctx, 2)
    lm.check_positions(ctx)
    info = {str(s): {"d": lm.width(s), "module": lm.module_path(s)} for s in sites}
    cfg.check_widths({s: v["d"] for s, v in info.items()})
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
    source = model_source(lm, mine, data, cfg.batch_size, cfg.seed, ctx=ctx, run_sites_of=sites)
    return Trainer(cfg, source, out, info, meta, device, progress, dist=dist, parallel=parallel).run(resume=resume)


def load_run_saes(run: str | Path, sites: list[str] | None = None, *,
                  device: str | torch.device = "cpu") -> dict[str, SAE]:
    """The SAEs of a run, by site name (all of them unless ``sites`` is given), on ``device``.

    Pass the model's device (``lm.device``) to load them where they will be used; functions that take
    a model and SAEs also move them there themselves (``sc_steer.devices.follow_model``).
    """
    root = Path(run) / "saes"
    if not root.is_dir():
        raise ScSteerError(f"{str(run)!r} has no saes/ folder (train first)")
    names = sites or [str(s) for s in sorted(_site_folders(root), key=lambda s: s.order)]
    if not names:
        raise ScSteerError(f"{str(run)!r}: saes/ holds no SAE folders (train first)")
    missing = [s for s in names if not (root / s).is_dir()]
    if missing:
        raise ScSteerError(f"run {str(run)!r} has no SAE for {', '.join(missing)}")
    return {s: load_sae(root / s, device) for s in names}


def _site_folders(root: Path) -> list:
    """The folders of saes/ named like sites (resid_post.3); anything else there (a backup, a stray
    folder) is not an SAE of this run and is left alone."""
    from .sites import Site

    found = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            try:
                found.append(Site.parse(p.name))
            except ScSteerError:
                continue
    return found


def open_run_model(run: str | Path, lm: LM | None = None, *, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "float32") -> LM:
    """``lm`` if given, else the model the run was trained on, opened on ``device`` in ``dtype``."""
    return lm if lm is not None else open_model(read_run(run)["model"], device=device, dtype=dtype)


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
    from .interpret import interpret, write_browser, write_plots

    lm = open_run_model(run, lm, device=device, dtype=dtype)
    saes = load_run_saes(run, sites, device=lm.device)
    ctx = next(iter(saes.values())).cfg.context_size or 256
    summary = interpret(lm, saes, data, run, max_tokens=max_tokens, ctx=ctx, neurons=neurons, progress=progress,
                        **options)
    write_browser(run, summary)
    write_plots(run, summary)
    return summary


DEMO_TRAIN = {"sites": ["resid_post.*"], "batch_size": 4096, "tokens": 1_228_800, "checkpoint_every": 50,
              "sae": {"architecture": "topk", "expansion": 8, "k": 32, "lr": 6e-3}}


def demo(out: str | Path = "runs/demo", *, collect_tokens: int = 1_200_000, train_tokens: int | None = None,
         eval_tokens: int = 50_000, interpret_tokens: int = 200_000, device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float32", progress: bool = True) -> dict[str, dict]:
    """collect -> train -> eval -> interpret -> graph on the shipped demo model, offline, on ``device``
    (SAEs train there too; the model runs in ``dtype``, SAEs in float32). Rerunning resumes."""
    from .sae.config import config_from_dict

    out = Path(out)
    cfg = config_from_dict(dict(DEMO_TRAIN, tokens=DEMO_TRAIN["tokens"] if train_tokens is None else train_tokens),
                           where="--train-tokens")
    validate.integer("--collect-tokens", collect_tokens, 1)
    if collect_tokens < cfg.batch_size:
        raise ScSteerError(f"--collect-tokens {collect_tokens:,}: fewer than one batch of the demo's training "
                           f"({cfg.batch_size:,} tokens)")
    validate.integer("--eval-tokens", eval_tokens, 1)
    validate.integer("--interpret-tokens", interpret_tokens, 1)
    lm = open_model("demo", device=device, dtype=dtype)
    # the folder is checked before the first write: a foreign run there is refused, not merged into
    # (its own collection may be there already: a demo killed while collecting resumes)
    check_run(out, {"model": "demo", "sites": [str(s) for s in lm.sites(cfg.sites)], "train_config": cfg.to_dict(),
                    "activations": str(out / "activations")})
    collect(lm, "resid_post.*", "demo", out / "activations", ctx=256, batch_size=16, max_tokens=collect_tokens,
            progress=progress)
    train_from_store(out / "activations", cfg, out, resume=True, device=lm.device, progress=progress)
    results = eval_run(out, "demo:heldout", lm=lm, max_tokens=eval_tokens, progress=progress)
    interpret_run(out, "demo:heldout", lm=lm, max_tokens=interpret_tokens, progress=progress)
    from .graph.run import graph_run

    graph_run(out, "demo:heldout", out / "graph", lm=lm, sources="top:12", prune="top_k", amount=2,
              max_prompts=32, progress=progress)
    return results
