"""What an interpretation writes for people to read: the post's top-token tables and the summary in
Markdown, with the statistics behind them (means with confidence intervals)."""
from __future__ import annotations

import math

from .explain import HEADLINE_K, K_VALUES

KIND_TITLES = {"sae": "SAE features", "resid": "residual dimensions", "mlp": "MLP neurons"}


def mean_with_ci(scores: list[float | None], z: float = 1.96) -> dict:
    """Mean over units with a normal-approximation 95% confidence interval, and the median."""
    vals = sorted(s for s in scores if s is not None and not math.isnan(s))
    if not vals:
        return {"n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1))
    half = z * sd / math.sqrt(len(vals))
    return {"n": len(vals), "mean": m, "ci95": [m - half, m + half], "median": vals[len(vals) // 2]}


def _mean_ci(s: dict) -> str:
    return f"{s['mean']:.3f} ±{(s['ci95'][1] - s['ci95'][0]) / 2:.3f}" if s.get("n") else "-"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "\\n").replace("`", "'")


def markdown_table(kind: str, site, records: list[dict]) -> str:
    """The post's table: one row per sampled live unit, its top input tokens."""
    title = f"# {KIND_TITLES[kind]} at {site}: top input tokens of {len(records)} sampled live units\n\n"
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
    lines += ["", "## Explanation scores\n",
              "A unit's explanation of length K is the K token ids (or, in the context variant, tokens and "
              "(previous token, token) pairs) that remove the most squared error on the even text rows; "
              "from it alone its activations on the odd rows are predicted; score = Pearson correlation of "
              "prediction and activation (sc_steer/interpret/explain.py; \"all\": every token seen, the "
              "whole lookup table). Mean over units with a 95% confidence interval.\n"]
    ks = [str(k) for k in K_VALUES] + ["all"]
    for name, title in (("tokens", "tokens"), ("context", "tokens and (previous token, token) pairs")):
        lines += [f"**Explanations of {title}**\n", "| units | site | " + " | ".join(f"K = {k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for s in summary["sets"].values():
            cells = [_mean_ci(s["explain"][name][k]) for k in ks]
            lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"**Sensitivity and specificity** of the K = {HEADLINE_K} token explanation on the odd rows (strongly "
              "active: at least half the largest deviation from the unit's mean; see explain.py).\n",
              "| units | site | sensitivity | specificity | named by a pair |", "|---|---|---|---|---|"]
    for s in summary["sets"].values():
        lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | {_mean_ci(s['sensitivity'])} "
                     f"| {_mean_ci(s['specificity'])} | {s['context_labels']} |")
    return "\n".join(lines) + "\n"


def probe_markdown(probes: dict) -> str:
    """``probe.md``: per label, balanced test accuracy of K-unit probes per unit set."""
    lines = ["# Sparse probing\n",
             "Per label, one task per class (it against the others) on half of the texts; the K units whose mean "
             "activation differs most between the classes on that half feed a class-balanced logistic "
             "regression; balanced accuracy on the other half, averaged over the tasks (chance: 0.5; see "
             "sc_steer/interpret/probe.py).\n"]
    for label, p in probes.items():
        ks = list(next(iter(p["sets"].values()))["accuracy"])
        counts = ", ".join(f"{k} {v}" for k, v in p["labels"].items())
        lines += [f"## {label} (`{p['data']}`: {p['n_texts']:,} texts; {counts})\n",
                  "| units | site | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
        for s in p["sets"].values():
            lines.append(f"| {KIND_TITLES[s['kind']]} | {s['site']} | "
                         + " | ".join(f"{s['accuracy'][k]:.3f}" for k in ks) + " |")
        lines.append("")
    return "\n".join(lines)
