"""The run folder: what a run holds, where, and the functions every stage reads and claims it with.

A run folder ties the stages together; each command takes the last one's output by the folder's path::

    runs/<name>/
      run.json                     model, data, sites, training config            (train)
      activations/                 manifest.json + shards/ (when collected here)  (collect)
      saes/<site>/                 cfg.json + sae_weights.safetensors (+ sparsity.safetensors),
                                   the SAELens v6 layout                          (train)
      checkpoint.safetensors       the trainer's resumable state (one per rank
                                   under --parallel layers)                       (train)
      train_log.jsonl, training_curves.png                                        (train)
      eval.json, eval.md           per-site metrics on held-out text              (eval)
      features/<site>.jsonl, .md   one interpretation record per SAE feature      (interpret)
      neurons/<site>.jsonl, .md    the same for residual dimensions and MLP neurons
      interpret.json, interpret.md, interpret_scores.png, density.png, explain_curves.png
      probe.json, probe.md         sparse probing accuracy by label, unit set and K  (probe)
      browser/index.html + data/   the static feature browser
      graph/                       the demo's feature graph (recipe.json + exports)  (graph)

Every file name a stage writes into a run is one of the constants below, and every check that a
folder is new or holds the same recipe (collection, run, graph) is ``claim_folder``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import ScSteerError
from .files import (
    atomic_write_text,
    check_folder,
    make_dir,
    parse_json,
    read_json,
    to_json,
)
from .models import LM, open_model
from .sae.base import SAE
from .sae.config import stored_config
from .sae.formats import load_sae
from .sites import Site

RUN_JSON = "run.json"
ACTIVATIONS = "activations"
SAES = "saes"
CHECKPOINT = "checkpoint.safetensors"
TRAIN_LOG = "train_log.jsonl"
CURVES = "training_curves.png"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
FEATURES, NEURONS = "features", "neurons"          # per unit kind: "sae" -> features/, others -> neurons/
INTERPRET_JSON, INTERPRET_MD = "interpret.json", "interpret.md"
SCORES_PNG, DENSITY_PNG, EXPLAIN_PNG = "interpret_scores.png", "density.png", "explain_curves.png"
PROBE_JSON, PROBE_MD = "probe.json", "probe.md"
BROWSER = "browser"
GRAPH = "graph"
GRAPH_RECIPE = "recipe.json"                       # in any graph folder, the run's own or another

# what makes two trainings the same run: a folder is only ever continued by the run that made it
RUN_IDENTITY = ("model", "dataset", "sites", "train_config")


def records_path(run: str | Path, site: str, kind: str = "sae") -> Path:
    """``features/<site>.jsonl`` for SAE features, ``neurons/<site>.jsonl`` for the neuron baselines."""
    return Path(run) / (FEATURES if kind == "sae" else NEURONS) / f"{site}.jsonl"


# -- claiming a folder ---------------------------------------------------------------------------
def claim_folder(folder: str | Path, marker: str, identity: dict, *, kind: str, what: str = "--out",
                 force: bool = False, forceable: bool = True, ignore: tuple[Path, ...] = ()) -> dict | None:
    """The one "new folder, or the same recipe" check, before anything is written.

    ``folder`` may be missing or empty (returns None), or hold ``marker`` (a JSON object) whose values
    equal ``identity``'s on every key of ``identity`` (returns the marker: a resume or a finished job).
    Anything else is refused in one line: another ``kind`` there, or a folder that is not empty and
    holds none (``ignore``: paths inside it that do not count, e.g. the run's own collection).
    ``force`` accepts any folder (the caller then starts over); ``forceable`` says whether the message
    offers ``--force``."""
    folder = check_folder(folder, what)
    hint = "; choose another folder" + (", or pass --force to start over there" if forceable else "")
    if force:
        return None
    path = folder / marker
    if path.exists():
        old = read_json(path, f"{kind} {marker}")
        same = json.loads(json.dumps(identity))   # tuples as lists, as they were written
        differs = [k for k in same if _comparable(k, old.get(k)) != _comparable(k, same[k])]
        if differs:
            raise ScSteerError(f"{what} {str(folder)!r} holds another {kind} (its {', '.join(differs)} differ)"
                               + hint)
        return old
    skip = {p.resolve() for p in ignore}
    if folder.is_dir() and any(p.resolve() not in skip for p in folder.iterdir()):
        raise ScSteerError(f"{what} {str(folder)!r} is not empty and is not an sc-steer {kind} (no {marker}){hint}")
    return None


def _comparable(key: str, value: Any) -> Any:
    """A stored value as it compares today (a training config written by an earlier version with
    today's key names)."""
    if key == "train_config" and isinstance(value, dict):
        return stored_config(value)
    return value


def start_run(run: str | Path, info: dict, *, force: bool = False) -> None:
    """Claim ``run`` for a training described by ``info`` and write its run.json.

    The folder must be new, or hold this same run (``RUN_IDENTITY``), so that a resume continues it
    and nothing foreign is mixed in; its own activation collection may already be inside it.
    ``force=True`` starts over: the old run's checkpoint, log and SAEs go first, so the folder never
    pairs this run.json with another run's SAEs."""
    run = Path(run)
    check_run(run, info, force=force)
    if force:
        for name in (CHECKPOINT, TRAIN_LOG, RUN_JSON):
            (run / name).unlink(missing_ok=True)
        shutil.rmtree(run / SAES, ignore_errors=True)
    make_dir(run)
    atomic_write_text(run / RUN_JSON, to_json(info, indent=1))


def check_run(run: str | Path, info: dict, *, force: bool = False) -> None:
    """Whether ``run`` may hold the training described by ``info``; writes nothing."""
    own = (Path(info["activations"]),) if info.get("activations") else ()
    identity = {k: info[k] for k in RUN_IDENTITY if k in info}
    claim_folder(run, RUN_JSON, identity, kind="run", force=force, ignore=own)


# -- reading a run -------------------------------------------------------------------------------
def read_run(run: str | Path) -> dict:
    """run.json: a JSON object that names the run's model."""
    path = Path(run) / RUN_JSON
    if not path.exists():
        raise ScSteerError(f"{str(run)!r} is not an sc-steer run (no {RUN_JSON})")
    info = read_json(path, "the run.json sc-steer train wrote", expect=None)
    if not isinstance(info, dict) or not isinstance(info.get("model"), str) or not info["model"]:
        raise ScSteerError(f"{str(path)!r} does not name the run's model (expected a JSON object with \"model\")")
    return info


def open_run_model(run: str | Path, lm: LM | None = None, *, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "float32") -> LM:
    """``lm`` if given, else the model the run was trained on, opened on ``device`` in ``dtype``."""
    return lm if lm is not None else open_model(read_run(run)["model"], device=device, dtype=dtype)


def sae_sites(run: str | Path) -> list[str]:
    """The sites of the run's SAEs, in forward order: the folders of saes/ named like sites (anything
    else there, a backup or a stray folder, is not an SAE of this run and is left alone)."""
    root = Path(run) / SAES
    if not root.is_dir():
        raise ScSteerError(f"{str(run)!r} has no {SAES}/ folder (train first)")
    found = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            try:
                found.append(Site.parse(p.name))
            except ScSteerError:
                continue
    return [str(s) for s in sorted(found, key=lambda s: s.order)]


def sae_dir(run: str | Path, site: str) -> Path:
    return Path(run) / SAES / site


def load_run_saes(run: str | Path, sites: list[str] | None = None, *,
                  device: str | torch.device = "cpu") -> dict[str, SAE]:
    """The SAEs of a run, by site name (all of them unless ``sites`` is given), on ``device``.

    Pass the model's device (``lm.device``) to load them where they will be used; functions that take
    a model and SAEs also move them there themselves (``sc_steer.devices.follow_model``)."""
    found = sae_sites(run)
    names = sites or found
    if not names:
        raise ScSteerError(f"{str(run)!r}: {SAES}/ holds no SAE folders (train first)")
    missing = [s for s in names if not sae_dir(run, s).is_dir()]
    if missing:
        raise ScSteerError(f"run {str(run)!r} has no SAE for {', '.join(missing)}")
    return {s: load_sae(sae_dir(run, s), device) for s in names}


def read_records(run: str | Path, site: str, kind: str = "sae") -> list[dict] | None:
    """The interpretation records of one unit set (one JSON object per line, unit i on line i), or None
    when the run has not been interpreted there."""
    path = records_path(run, site, kind)
    if not path.exists():
        return None
    return [parse_json(line, f"{str(path)!r} line {i + 1}", dict, "one unit's record; rerun sc-steer interpret")
            for i, line in enumerate(path.read_text().splitlines())]


def read_record(run: str | Path, site: str, unit: int, kind: str = "sae") -> dict:
    """One unit's record; clear errors for a missing interpretation and for ids out of range."""
    records = read_records(run, site, kind)
    if records is None:
        raise ScSteerError(f"no interpretation for {site} in {str(run)!r} (run sc-steer interpret first)")
    if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit < len(records):
        raise ScSteerError(f"feature id {unit} is out of range for {site}: it has {len(records)} units "
                           f"(0-{len(records) - 1})")
    return records[unit]
