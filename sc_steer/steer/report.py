"""``steer-eval``'s result as people read it: a Markdown report and a concept-vs-fluency plot per method."""
from __future__ import annotations

import math
from pathlib import Path


def _f(x, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _text(s: str, n: int = 90) -> str:
    s = s.replace("\n", " / ").replace("|", "\\|")
    return s if len(s) <= n else s[:n - 1] + "…"


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return float("nan")

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((u - ma) * (v - mb) for u, v in zip(a, b))
    var = math.sqrt(sum((u - ma) ** 2 for u in a) * sum((v - mb) ** 2 for v in b))
    return cov / var if var > 0 else float("nan")


def markdown(result: dict, labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    st = result["settings"]
    lines = ["# Steering methods side by side\n",
             (f"{len(result['facts'])} features x {len(st['methods'])} methods x {len(st['coeffs'])} coefficients "
             f"({', '.join(f'{c:g}' for c in st['coeffs'])}) x {len(st['prompts'])} prompts x "
             f"{len(st['decodings'])} decodings, {st['max_new_tokens']} new tokens each. Matched cost: per feature "
             f"and method, the coefficient with the most concept among those keeping fluency F >= "
             f"{st['min_fluency']:g} of the unsteered run's, chosen on prompts "
             f"{', '.join(str(i) for i in result['prompts_choosing'])} and scored on prompts "
             f"{', '.join(str(i) for i in result['prompts_scoring'])}.\n"),
             "| method | H (rank) | concept C | fluency F | KL | wrong way | features within the bound | wins |",
             "|---|---|---|---|---|---|---|---|"]
    n = len(result["facts"])
    for r in result["methods"]:
        lines.append(f"| {r['method']} | {_f(r['H'])} | {_f(r['C'])} | {_f(r['F'])} | {_f(r['kl'])} | "
                     f"{_f(r['wrong_way'], 2)} | {r['within_bound']}/{n} | {r['wins']} |")
    if "steerability" in result:
        s = result["steerability"]
        lines += ["", (f"Steerability (output score) against the `add` method at matched cost, over {s['n']} "
                       f"features: Spearman {_f(s['spearman_C'])} with concept C, {_f(s['spearman_H'])} with H, "
                       f"{_f(s['spearman_gain'])} with the raw concept gain averaged over coefficients.")]
    lines += ["", "## Per feature, at matched cost", "",
              "| feature | label | method | coeff | concept (unsteered) | logprob (unsteered) | rep | KL | C | F | H |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["chosen"]:
        coeff = "—" if c.get("coeff") is None else f"{c['coeff']:g}"
        lines.append(f"| {c['feature']} | {_text(labels.get(c['feature'], ''), 30)} | {c['method']} | {coeff} | "
                     f"{_f(c.get('concept'))} ({_f(c['baseline_concept'])}) | {_f(c.get('logprob'))} "
                     f"({_f(c['baseline_logprob'])}) | {_f(c.get('rep'), 2)} | {_f(c.get('kl'))} | {_f(c['C'], 2)} | "
                     f"{_f(c['F'], 2)} | {_f(c['H'], 2)} |")
    first = result["prompts_scoring"][0]
    lines += ["", f"## What the chosen settings wrote (greedy, prompt {first})", ""]
    by = {(s["feature"], s["method"], s["coeff"]): s["text"] for s in result["samples"]
          if s["decoding"] == "greedy" and s["prompt"] == first}
    base = {s["feature"]: s["text"] for s in result["samples"]
            if s["method"] == "none" and s["decoding"] == "greedy" and s["prompt"] == first}
    prompt = st["prompts"][first]
    for f in [ft["feature"] for ft in result["facts"]]:
        lines.append(f"**{f}** {labels.get(f, '')} — prompt {prompt!r}, unsteered: {_text(base.get(f, ''))}\n")
        for c in result["chosen"]:
            if c["feature"] == f and c["within"]:
                coeff = None if c["method"] == "prompt" else c["coeff"]
                lines.append(f"- {c['method']} {'' if coeff is None else f'at {coeff:g}'}: "
                             f"{_text(by.get((f, c['method'], coeff), ''))}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """One panel per method: normalised fluency F (x) against concept C (y), one line per feature over
    the coefficients, its matched-cost choice circled, the fluency bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["settings"]["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4), sharey=True, squeeze=False)
    feats = [ft["feature"] for ft in result["facts"]]
    colors = plt.cm.tab10.colors
    for ax, m in zip(axes[0], methods):
        for i, f in enumerate(feats):
            rows = sorted((r for r in result["table"] if r["feature"] == f and r["method"] == m),
                          key=lambda r: r["coeff"] if r["coeff"] is not None else 0)
            ax.plot([r["F"] for r in rows], [r["C"] for r in rows], "-o", ms=3, lw=1, color=colors[i % 10],
                    label=f if m == methods[0] else None)
            for c in result["chosen"]:
                if c["feature"] == f and c["method"] == m and c["within"]:
                    ax.plot([c["F"]], [c["C"]], "o", ms=9, mfc="none", color=colors[i % 10])
        ax.axvline(result["settings"]["min_fluency"], ls="--", color="grey", lw=0.8)
        ax.set_title(m)
        ax.set_xlabel("fluency F")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("concept C")
    if len(feats) <= 12:
        fig.legend(loc="lower center", ncol=min(len(feats), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if len(feats) <= 12 else 0, 1, 1))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
