"""``sc-steer steer-eval`` and ``sc-steer steerability`` on a run folder: which features, which prompts,
and where the results go."""
from __future__ import annotations

import random
from pathlib import Path

from .. import rundir
from ..errors import ScSteerError
from ..files import atomic_write_text, make_dir, to_json
from ..models import LM
from .compare import neutral_prompts, read_prompts, steer_eval
from .recipe import Recipe
from .report import markdown, plot, spearman
from .steerability import SCALE, output_scores, read_steerability, write_steerability

STEER_EVAL_JSON, STEER_EVAL_MD, STEER_EVAL_PNG = "steer_eval.json", "steer_eval.md", "steer_eval.png"


def prompts_from(spec: str | None, n: int = 8) -> list[str]:
    """A ``.txt`` file (one prompt per line) or ``.json`` list, all of its prompts, or the neutral openings
    of ``n`` documents of a data spec (default ``demo:heldout``)."""
    if spec and spec.endswith((".txt", ".json")):
        return read_prompts(spec)
    return neutral_prompts(spec or "demo:heldout", n)


def _alive(run, site: str) -> list[int]:
    recs = rundir.read_records(run, site)    # one record per feature, in id order
    if recs is not None:
        return [i for i, r in enumerate(recs) if (r.get("density") or 0) > 0]
    return list(range(rundir.load_run_saes(run, [site])[site].cfg.d_sae))


def parse_features(run: str | Path, spec: str | None, recipe: str | None, seed: int = 0) -> list[tuple[str, int]]:
    """Comma-separated parts, each ``SITE:ID``, ``top:N[:SITE]`` (the live features of highest
    steerability) or ``sample:N[:SITE]`` (live features at random), plus the features of a recipe's
    interventions. Live: active on the held-out text the run was interpreted on (every feature where it
    was not interpreted)."""
    sites = rundir.sae_sites(run)
    out: list[tuple[str, int]] = []
    if recipe:
        out += [(it.site, it.feature) for it in Recipe.load(recipe).interventions if it.feature is not None]
        if not out:
            raise ScSteerError(f"--recipe {recipe!r}: no intervention names a feature")
    for part in (spec or "").split(","):
        part = part.strip()
        if part:
            out += _feature_part(run, part, sites, seed)
    if not out:
        raise ScSteerError("steer-eval: name the features: --features SITE:ID,..., top:N, sample:N, or --recipe")
    saes = rundir.load_run_saes(run, sorted({s for s, _ in out}))
    for s, f in out:
        if not 0 <= f < saes[s].cfg.d_sae:
            raise ScSteerError(f"--features {s}:{f}: feature id out of range for {s} (0-{saes[s].cfg.d_sae - 1})")
    return list(dict.fromkeys(out))


def _feature_part(run, part: str, sites: list[str], seed: int) -> list[tuple[str, int]]:
    head, _, rest = part.partition(":")
    if head not in ("top", "sample"):
        site, _, fid = part.rpartition(":")
        if site not in sites or not fid.isdigit():
            raise ScSteerError(f"--features {part!r}: expected SITE:ID with a site of the run "
                               f"({', '.join(sites)}), top:N[:SITE] or sample:N[:SITE]")
        return [(site, int(fid))]
    n_s, _, site = rest.partition(":")
    if not n_s.isdigit() or int(n_s) < 1:
        raise ScSteerError(f"--features {part!r}: expected {head}:N or {head}:N:SITE with N >= 1")
    chosen = [site] if site else sites
    for s in chosen:
        if s not in sites:
            raise ScSteerError(f"--features {part!r}: no SAE for {s} (have: {', '.join(sites)})")
    if head == "sample":
        pool = [(s, i) for s in chosen for i in _alive(run, s)]
        return sorted(random.Random(seed).sample(pool, min(int(n_s), len(pool))))
    scored = []
    for s in chosen:
        st = read_steerability(run, s)
        if st is None or st.get("features") is not None:
            raise ScSteerError(f"--features {part!r}: {s} has no steerability of every feature yet; run "
                               f"sc-steer steerability --run {run} first")
        alive = set(_alive(run, s))
        scored += [(v, s, i) for i, v in enumerate(st["scores"]) if i in alive]
    scored.sort(key=lambda t: -t[0])
    return [(s, i) for _, s, i in scored[:int(n_s)]]


def steer_eval_run(run: str | Path, features: list[tuple[str, int]], prompts: list[str], out: str | Path, *,
                   lm: LM, **kw) -> dict:
    """``steer_eval`` on a run's SAEs; writes ``steer_eval.json``, ``.md`` and ``.png`` into ``out``."""
    saes = rundir.load_run_saes(run, sorted({s for s, _ in features}), device=lm.device)
    result = steer_eval(lm, saes, features, prompts, **kw)
    records = {s: rundir.read_records(run, s) for s, _ in features}
    steer = {s: read_steerability(run, s) for s in records}
    labels = {f"{s}:{f}": records[s][f].get("label", "") for s, f in features if records[s] is not None}
    scored = {f"{s}:{f}": steer[s]["scores"][f] for s, f in features
              if steer[s] is not None and steer[s].get("features") is None}
    if len(scored) >= 3:
        add = {c["feature"]: c for c in result["chosen"] if c["method"] == "add"}
        gain = {}
        for r in result["table"]:
            if r["method"] == "add":
                gain.setdefault(r["feature"], []).append(r["concept"] - add[r["feature"]]["baseline_concept"])
        names = [f for f in scored if f in add]
        xs = [scored[f] for f in names]
        result["steerability"] = {
            "n": len(names), "output_score": dict(zip(names, xs)),
            "spearman_C": spearman(xs, [add[f]["C"] for f in names]),
            "spearman_H": spearman(xs, [add[f]["H"] for f in names]),
            "spearman_gain": spearman(xs, [sum(gain[f]) / len(gain[f]) for f in names])}
    out = make_dir(out, "--out")
    atomic_write_text(out / STEER_EVAL_JSON, to_json(result, indent=1, default=float))
    atomic_write_text(out / STEER_EVAL_MD, markdown(result, labels))
    plot(result, out / STEER_EVAL_PNG)
    return result


def steerability_run(run: str | Path, *, lm: LM, sites: list[str] | None = None, prompts: list[str] | None = None,
                     scale: float = SCALE, progress: bool = True) -> dict[str, dict]:
    """The output score of every feature of each site (default: every site of the run), written beside
    its interpretation records."""
    names = sites or rundir.sae_sites(run)
    saes = rundir.load_run_saes(run, names, device=lm.device)
    prompts = prompts or neutral_prompts()
    out = {}
    for s in names:
        out[s] = output_scores(lm, saes[s], s, prompts, scale=scale, progress=progress)
        write_steerability(run, out[s])
    return out
