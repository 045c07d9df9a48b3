"""Steering methods side by side (``sc-steer steer-eval``): every method over a coefficient grid on the
same prompts, greedy and sampled, each continuation scored by ``scores.py``, and each method judged at
its best coefficient of matched cost.

Per feature, scores are normalised against its unsteered continuations:

* concept ``C`` = (concept - unsteered) / (on-topic - unsteered), clipped to [0, 1], where on-topic is the
  feature's mean over the 16 stretches of real text (of the continuation's length) where it is highest
  (``FeatureFacts.on_topic``): 1 means the continuation holds as much of the concept as the most
  on-topic text does, whatever the other methods reached;
* fluency ``F`` = min(1, exp(logprob - unsteered logprob)) x min(1, (1 - rep) / (1 - unsteered rep)),
  ``rep`` the mean of the repeated 2- and 3-gram shares;
* ``H`` = the harmonic mean of C and F.

Matched cost: for each feature and method, the coefficient with the highest C among those with
F >= ``min_fluency`` (none: the method scores 0 there), chosen on half the prompts and scored on the
other half. Methods are ranked by mean H over features; the wrong-way rate is the share of samples
whose concept fell below the unsteered run's on the same prompt and decoding.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from tqdm.auto import tqdm

from .. import validate
from ..data import iter_documents
from ..devices import follow_model
from ..errors import ScSteerError
from ..files import parse_json
from ..models import LM
from ..sae import SAE
from .generate import generate_batch, left_pad
from .methods import METHODS, feature_facts, settings
from .scores import Concept, score_concepts

DEFAULT_COEFFS = (2.0, 4.0, 8.0, 12.0, 16.0, 24.0)
MIN_FLUENCY = 0.7
PROMPT_WORDS = 5


def neutral_prompts(data: str = "demo:heldout", n: int = 8, words: int = PROMPT_WORDS) -> list[str]:
    """Openings of ``n`` documents of ``data``: the first ``words`` words of each one's first line of at
    least eight words (a leading verse reference such as ``Jdgs1:21`` dropped)."""
    out = []
    for doc in iter_documents(data):
        for line in doc.splitlines():
            w = re.sub(r"^\S*\d+:\d+\s+", "", line.strip()).split()
            if len(w) >= 8:
                out.append(" ".join(w[:words]))
                break
        if len(out) == n:
            return out
    if not out:
        raise ScSteerError(f"prompts: {data!r} has no line of eight words or more to open a prompt with")
    return out


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a ``.txt`` file, or a ``.json`` list of strings (prompts that
    hold line breaks)."""
    p = Path(path)
    if not p.is_file():
        raise ScSteerError(f"--prompts {str(path)!r}: no such file")
    if p.suffix == ".json":
        prompts = parse_json(p.read_text(encoding="utf-8"), f"--prompts {str(path)!r}", list, "a list of strings")
        if not all(isinstance(x, str) for x in prompts):
            raise ScSteerError(f"--prompts {str(path)!r}: expected a JSON list of strings")
        prompts = [x for x in prompts if x.strip()]
    else:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ScSteerError(f"--prompts {str(path)!r}: the file holds no prompt")
    return prompts


def check_coeffs(coeffs) -> list[float]:
    if not coeffs:
        raise ScSteerError("--coeffs: give at least one coefficient")
    out = [validate.number("--coeffs value", c, -1e4, 1e4) for c in coeffs]
    return out


def steer_eval(lm: LM, saes: dict[str, SAE], features: list[tuple[str, int]], prompts: list[str], *,
               methods: tuple[str, ...] = METHODS, coeffs=DEFAULT_COEFFS, max_new_tokens: int = 24,
               seeds: tuple[int, ...] = (0,), greedy: bool = True, vector_data: str = "demo",
               vector_tokens: int = 20_000, min_fluency: float = MIN_FLUENCY, progress: bool = True) -> dict:
    """Every method at every coefficient on every prompt and decoding (greedy, then sampling at
    temperature 1 with each seed), scored and summarised as the module docstring says."""
    follow_model(saes, lm)
    coeffs = check_coeffs(coeffs)
    validate.number("--min-fluency", min_fluency, 0, 1)
    for m in methods:
        validate.choice("--methods", m, METHODS)
    if not features:
        raise ScSteerError("steer-eval: give at least one feature")
    if not prompts:
        raise ScSteerError("steer-eval: give at least one prompt")
    decodings = ([("greedy", None)] if greedy else []) + [("sample", int(s)) for s in seeds]
    if not decodings:
        raise ScSteerError("steer-eval: no decoding: keep greedy or give --seeds")
    for s, f in features:
        Concept.of_feature(lm, saes, s, f)      # an unknown site or id: one error line before any work
    facts, skipped = feature_facts(lm, saes, features, vector_data, max_tokens=vector_tokens,
                                   window=max_new_tokens, progress=progress)
    if not facts:
        raise ScSteerError("steer-eval: no feature can be steered towards by every method: "
                           + "; ".join(f"{name} {why}" for name, why in skipped))
    for name, why in skipped:
        tqdm.write(f"skipped {name}: {why}")
    features = [(ft.site, ft.feature) for ft in facts]
    concepts = [Concept.of_feature(lm, saes, s, f) for s, f in features]
    tok = lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    rows = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    runs = [(i, st) for i, ft in enumerate(facts) for m in methods for st in settings(ft, m, coeffs, newline)]
    bar = tqdm(total=(len(runs) + 1) * len(decodings), desc="steer-eval", disable=not progress)
    samples = []

    def run(feature_index: int | None, st, decoding) -> None:
        kind, seed = decoding
        gen_rows = [bos + st.prefix + r[len(bos):] for r in rows] if st and st.prefix else rows
        ids, n = generate_batch(lm, left_pad(lm, gen_rows), None if st is None else _recipe(st), saes,
                                max_new_tokens=max_new_tokens, do_sample=kind == "sample", seed=seed or 0)
        cont = ids[:, n:]
        texts = [tok.decode(c, skip_special_tokens=True) for c in cont]
        which = [feature_index] if feature_index is not None else list(range(len(features)))
        per_concept = score_concepts(lm, saes, [concepts[i] for i in which], rows, cont,
                                     steered_rows=gen_rows if st and st.prefix else None,
                                     items=st.items if st else [])
        for i, scores in zip(which, per_concept):
            for p, (sc, text) in enumerate(zip(scores, texts)):
                samples.append({"feature": facts[i].name, "method": st.method if st else "none",
                                "coeff": st.coeff if st else 0.0, "decoding": kind, "seed": seed, "prompt": p,
                                "text": text, **sc})
        bar.update()

    for d in decodings:
        run(None, None, d)
    for i, st in runs:
        for d in decodings:
            run(i, st, d)
    bar.close()
    result = summarise(samples, {ft.name: ft.on_topic for ft in facts}, methods, min_fluency, len(prompts))
    result["settings"] = {"prompts": prompts, "coeffs": coeffs, "methods": list(methods), "decodings": decodings,
                          "max_new_tokens": max_new_tokens, "min_fluency": min_fluency,
                          "vector_data": vector_data, "vector_tokens": vector_tokens}
    result["skipped"] = [{"feature": name, "why": why} for name, why in skipped]
    result["facts"] = [{"feature": ft.name, "peak": ft.peak, "n_strong": ft.n_strong, "on_topic": ft.on_topic,
                        "top_window": tok.decode(ft.top_window), "off_window": tok.decode(ft.off_window)}
                       for ft in facts]
    result["samples"] = samples
    return result


def _recipe(st):
    from .recipe import Recipe

    return Recipe(list(st.items)) if st.items else None


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def fluency(logprob: float, rep: float, base_logprob: float, base_rep: float) -> float:
    """Normalised fluency F of the module docstring."""
    f = min(1.0, math.exp(logprob - base_logprob))
    return f * (min(1.0, (1 - rep) / (1 - base_rep)) if base_rep < 1 else 1.0)


def harmonic(c: float, f: float) -> float:
    return 2 * c * f / (c + f) if c + f > 0 else 0.0


def _stats(samples: list[dict], feature: str, prompts: set[int], on_topic: float) -> tuple[dict, list[dict]]:
    """The unsteered means and the per (method, coefficient) rows of one feature over some prompts,
    with C, F and H as the module docstring defines them."""
    def key(s):
        return (s["decoding"], s["seed"], s["prompt"])

    mine = [s for s in samples if s["feature"] == feature and s["prompt"] in prompts]
    base = {key(s): s for s in mine if s["method"] == "none"}
    b = {"concept": _mean(s["concept"] for s in base.values()), "logprob": _mean(s["logprob"] for s in base.values()),
         "rep": _mean((s["rep2"] + s["rep3"]) / 2 for s in base.values())}
    groups: dict = {}
    for s in mine:
        if s["method"] != "none":
            groups.setdefault((s["method"], s["coeff"]), []).append(s)
    rows = []
    for (m, c), ss in groups.items():
        rep = _mean((s["rep2"] + s["rep3"]) / 2 for s in ss)
        lp = _mean(s["logprob"] for s in ss)
        rows.append({"feature": feature, "method": m, "coeff": c, "n": len(ss),
                     "concept": _mean(s["concept"] for s in ss), "concept_lens": _mean(s["concept_lens"] for s in ss),
                     "logprob": lp, "rep": rep, "kl": _mean(s["kl"] for s in ss),
                     "wrong_way": _mean(float(s["concept"] < base[key(s)]["concept"]) for s in ss),
                     "F": fluency(lp, rep, b["logprob"], b["rep"])})
    span = on_topic - b["concept"]
    for r in rows:
        r["C"] = min(1.0, max(0.0, (r["concept"] - b["concept"]) / span)) if span > 0 else 0.0
        r["H"] = harmonic(r["C"], r["F"])
    return b, rows


def split_prompts(n: int) -> tuple[set[int], set[int]]:
    """Prompts that choose each method's coefficient (even places) and prompts that score the choice (odd
    places), so that the reported scores are not the maximum they were chosen as; one prompt does both."""
    if n < 2:
        return {0}, {0}
    return set(range(0, n, 2)), set(range(1, n, 2))


def summarise(samples: list[dict], on_topic: dict[str, float], methods, min_fluency: float, n_prompts: int) -> dict:
    """Per (feature, method, coefficient) means on the scoring prompts; per (feature, method) the
    coefficient chosen on the choosing prompts (matched cost) and its scores on the scoring prompts; per
    method the means over features at that choice, ranked by H."""
    choose, score = split_prompts(n_prompts)
    features = list(on_topic)
    table, chosen = [], []
    for f in features:
        _, pick_rows = _stats(samples, f, choose, on_topic[f])
        base, rows = _stats(samples, f, score, on_topic[f])
        table += rows
        at = {(r["method"], r["coeff"]): r for r in rows}
        for m in methods:
            ok = [r for r in pick_rows if r["method"] == m and r["F"] >= min_fluency]
            best = max(ok, key=lambda r: (r["C"], -abs(r["coeff"] or 0))) if ok else None
            got = at[(m, best["coeff"])] if best else None
            chosen.append({"feature": f, "method": m, "within": best is not None,
                           "baseline_concept": base["concept"], "baseline_logprob": base["logprob"],
                           "on_topic": on_topic[f],
                           **({k: got[k] for k in ("coeff", "concept", "concept_lens", "logprob", "rep", "kl",
                                                     "wrong_way", "C", "F", "H")} if got else
                              {"coeff": None, "C": 0.0, "F": float("nan"), "H": 0.0})})
    summary = []
    for m in methods:
        cs = [c for c in chosen if c["method"] == m]
        wins = sum(1 for f in features
                   if max((c for c in chosen if c["feature"] == f), key=lambda c: c["H"])["method"] == m
                   and any(c["H"] > 0 for c in chosen if c["feature"] == f))
        summary.append({"method": m, "H": _mean(c["H"] for c in cs), "C": _mean(c["C"] for c in cs),
                        "F": _mean(c.get("F") for c in cs), "kl": _mean(c.get("kl") for c in cs),
                        "wrong_way": _mean(c.get("wrong_way") for c in cs),
                        "within_bound": sum(c["within"] for c in cs), "wins": wins})
    summary.sort(key=lambda r: -r["H"])
    return {"methods": summary, "chosen": chosen, "table": table,
            "prompts_choosing": sorted(choose), "prompts_scoring": sorted(score)}
