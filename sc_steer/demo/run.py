"""``sc-steer demo``: train one SAE per layer of the shipped demo model, evaluate, interpret and graph
them, offline, sized for a first run on a laptop (the README gives its time, memory and disk).

Training streams activations from the model (``pipeline.train_from_model``): nothing is cached on
disk. Each finished stage is recorded in the run's ``demo.json`` with its settings, wall time and
peak memory. A rerun skips every stage recorded with the same settings, so a killed demo goes on
where it stopped (training from its checkpoint) and a finished one returns at once; a stage whose
settings changed is redone, and every stage after it. The training checkpoint is removed once
training is recorded. ``FULL`` (``--full``) are the longer budgets of the first demo.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import rundir, validate
from ..devices import host_memory_returned, release_host_memory
from ..errors import ScSteerError
from ..evaluate import markdown_table
from ..files import atomic_write_text, read_json, to_json
from ..models import open_model
from ..pipeline import eval_run, graph_run, interpret_run, train_from_model
from ..sae.config import config_from_dict
from ..usage import Stage, disk_bytes, mib

DEMO_JSON = "demo.json"
STAGES = ("train", "eval", "interpret", "graph")
QUICK = {"train_tokens": 819_200, "eval_tokens": 25_000, "interpret_tokens": 100_000}
FULL = {"train_tokens": 1_228_800, "eval_tokens": 50_000, "interpret_tokens": 200_000}
DEMO_TRAIN = {"sites": ["resid_post.*"], "batch_size": 4096, "checkpoint_every": 25,
              "sae": {"architecture": "topk", "expansion": 8, "k": 32, "lr": 6e-3}}
BUFFER_TOKENS = 1 << 17   # the training's shuffle buffer, per site, in bfloat16 (256 MiB for the four sites)
DEMO_GRAPH = {"sources": "top:12", "prune": "top_k", "amount": 2, "max_prompts": 32}
DATA, HELDOUT, CTX = "demo", "demo:heldout", 256


def budgets(full: bool = False, train_tokens: int | None = None, eval_tokens: int | None = None,
            interpret_tokens: int | None = None) -> dict[str, int]:
    """The demo's token budgets: QUICK (or FULL), with any given one in its place."""
    given = {"train_tokens": train_tokens, "eval_tokens": eval_tokens, "interpret_tokens": interpret_tokens}
    out = dict(FULL if full else QUICK) | {k: v for k, v in given.items() if v is not None}
    for k, v in out.items():
        validate.integer("--" + k.replace("_", "-"), v, 1)
    return out


def stage_settings(b: dict[str, int], train_config: dict) -> dict[str, dict]:
    """What each stage's output depends on: a stage recorded with other settings is redone."""
    return {"train": {"train_config": train_config, "data": DATA, "ctx": CTX},
            "eval": {"tokens": b["eval_tokens"], "data": HELDOUT},
            "interpret": {"tokens": b["interpret_tokens"], "data": HELDOUT},
            "graph": dict(DEMO_GRAPH, prompts=HELDOUT)}


def read_record(out: Path) -> dict:
    path = out / DEMO_JSON
    record = read_json(path, "the demo's stage record") if path.exists() else {}
    if not isinstance(record.get("stages"), dict):
        record["stages"] = {}
    return record


def demo(out: str | Path = "runs/demo", *, full: bool = False, train_tokens: int | None = None,
         eval_tokens: int | None = None, interpret_tokens: int | None = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float32", force: bool = False, progress: bool = True) -> dict:
    """train -> eval -> interpret -> graph on the demo model (SAEs train on ``device``; the model runs in
    ``dtype``, SAEs in float32). Returns the demo record (what ``summary`` prints); reruns resume."""
    out = Path(out)
    b = budgets(full, train_tokens, eval_tokens, interpret_tokens)
    if b["train_tokens"] < DEMO_TRAIN["batch_size"]:
        raise ScSteerError(f"--train-tokens {b['train_tokens']:,}: fewer than one batch of the demo's training "
                           f"({DEMO_TRAIN['batch_size']:,} tokens)")
    cfg = config_from_dict(dict(DEMO_TRAIN, tokens=b["train_tokens"]), where="--train-tokens")
    settings = stage_settings(b, cfg.to_dict())
    record = {"stages": {}} if force else read_record(out)
    todo = []
    for name in STAGES:   # a redone stage makes every later one stale
        done = record["stages"].get(name)
        if todo or not done or done.get("settings") != json.loads(json.dumps(settings[name])):
            todo.append(name)
    if not todo:
        return record
    lm = open_model("demo", device=device, dtype=dtype)
    run = {"train": lambda: train_from_model(lm, DATA, cfg, out, ctx=CTX, resume=not force, device=lm.device,
                                             force=force, progress=progress, buffer_tokens=BUFFER_TOKENS,
                                             buffer_dtype=torch.bfloat16),
           "eval": lambda: eval_run(out, HELDOUT, lm=lm, max_tokens=b["eval_tokens"], progress=progress),
           "interpret": lambda: interpret_run(out, HELDOUT, lm=lm, max_tokens=b["interpret_tokens"],
                                              progress=progress),
           "graph": lambda: graph_run(out, HELDOUT, out / rundir.GRAPH, lm=lm, progress=progress, force=True,
                                      **DEMO_GRAPH)}
    for name in todo:
        record["stages"].pop(name, None)
    for name in todo:
        with Stage() as s, host_memory_returned():
            run[name]()
        release_host_memory(collect=True)
        record["stages"][name] = {"settings": settings[name], "seconds": round(s.seconds, 1), "peak_rss": s.peak,
                                  "peak_exact": s.peak_exact}
        atomic_write_text(out / DEMO_JSON, to_json(record, indent=1))
        if name == "train":
            (out / rundir.CHECKPOINT).unlink(missing_ok=True)   # finished: nothing left to resume
    return record


def summary(out: str | Path, record: dict, seconds: float | None = None) -> str:
    """What the demo did and where to go next: stage times and memory, disk, the quality figures."""
    out = Path(out)
    lines = [f"demo run: {out}", "", "| stage | wall time | peak memory |", "|---|---|---|"]
    for name in STAGES:
        st = record["stages"].get(name)
        if st:
            sampled = "" if st.get("peak_exact", True) else " (sampled)"
            lines.append(f"| {name} | {st['seconds']:.0f} s | {mib(st['peak_rss'])}{sampled} |")
    total = sum(st["seconds"] for st in record["stages"].values())
    lines.append(f"| all stages | {total:.0f} s | {mib(max(st['peak_rss'] for st in record['stages'].values()))} |")
    if seconds is not None:
        lines.append(f"\nthis command: {seconds:.1f} s")
    lines.append(f"disk: {mib(disk_bytes(out))} in {out}")
    ev = read_json(out / rundir.EVAL_JSON, "the demo's eval.json")
    lines += ["", f"quality on {ev['meta'].get('max_tokens', 0):,} held-out tokens ({HELDOUT}):", "",
              markdown_table(ev["sites"]).rstrip()]
    site, feature, label = example_feature(out)
    lines += ["", "next:",
              f"  sc-steer app --run {out}       # the playground: steer with the features, side by side",
              f"  {out / rundir.BROWSER / 'index.html'}   # open in a browser: every feature's tokens, contexts, logit lens",
              f"  cat {out / rundir.INTERPRET_MD}   # SAE features against neurons, by explanation length",
              f"  sc-steer probe --run {out}     # sparse probing: which units tell the text's source",
              f"  sc-steer steer --run {out} --prompt 'HAMLET.' --add {site}:{feature}:12   # feature {feature}: {label}",
              f"  sc-steer steer-eval --run {out} --features {site}:{feature}   # did it steer? five methods, scored",
              f"  sc-steer graph --run {out} --prompt 'And the children of Israel did evil in the sight of the' --out {out}-prompt-graph"
              "   # one prompt's circuit, down to the logits",
              f"  sc-steer demo --out {out}-full --full   # the longer demo (more training and held-out text)"]
    return "\n".join(lines)


def example_feature(out: Path, site: str = "resid_post.1") -> tuple[str, int, str]:
    """A feature worth steering with first: the best explained by five tokens among those that fire on
    0.1-5% of tokens (rarer ones are noise, denser ones grammar)."""
    records = rundir.read_records(out, site) or []
    fair = [r for r in records if 0.001 <= r["density"] <= 0.05 and r.get("explain_score") is not None]
    best = max(fair, key=lambda r: r["explain_score"], default={"id": 0, "label": "?"})
    return site, best["id"], best["label"]
