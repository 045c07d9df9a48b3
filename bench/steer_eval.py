"""Steering measured on a demo run, as a user would run it: steerability of every feature of every site,
the methods side by side on 8 features, and steerability's rank correlation with the concept score.

    python bench/steer_eval.py --run runs/demo [--save bench/results/steer-eval.md]

Three commands, each timed as a whole process (``/usr/bin/time -v``, one after the other, nothing else
on the machine):

1. ``sc-steer steerability --run RUN``: the output score of every feature of the run's sites;
2. ``sc-steer steer-eval --run RUN --features FEATURES``: 5 methods x 6 coefficients x 8 prompts x
   2 decodings (greedy, one sampled seed) on 8 features (default: the 4 most steerable of
   ``resid_post.1`` and of ``resid_post.2``, where every method can act; issue 26 asks for it within 10
   minutes on the 2-core machine);
3. ``sc-steer steer-eval --features sample:N --methods add``: N features drawn at random, for the
   rank correlation of their output score with the concept score of steering them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo import timed  # noqa: E402

DEFAULT_FEATURES = "top:4:resid_post.1,top:4:resid_post.2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--features", default=DEFAULT_FEATURES)
    ap.add_argument("--sample", type=int, default=32, help="features drawn for the correlation")
    ap.add_argument("--save", help="also write the report to this file")
    args = ap.parse_args()
    run = Path(args.run)
    exe = str(Path(sys.executable).parent / "sc-steer")
    lines = [f"# Steering benchmark on {run}\n"]

    wall, rss, out = timed([exe, "steerability", "--run", str(run)])
    lines += [f"## 1. `sc-steer steerability --run {run}`: {wall:.0f} s, {rss:,.0f} MiB max RSS\n", "```", out.strip(),
              "```\n"]
    scores = {s.name.removesuffix(".steerability.json"): json.loads(s.read_text())
              for s in sorted((run / "features").glob("*.steerability.json"))}
    lines += ["| site | features | coefficient | mean | share > 0.01 | max |", "|---|---|---|---|---|---|"]
    for site, st in scores.items():
        v = st["scores"]
        lines.append(f"| {site} | {len(v)} | {st['coeff']:.2f} | {sum(v) / len(v):+.4f} | "
                     f"{sum(x > 0.01 for x in v) / len(v):.1%} | {max(v):+.3f} |")

    out_dir = run / "steer_eval"
    wall, rss, out = timed([exe, "steer-eval", "--run", str(run), "--features", args.features, "--out", str(out_dir)])
    lines += ["", f"## 2. `sc-steer steer-eval --run {run} --features {args.features}`: {wall:.0f} s, "
                  f"{rss:,.0f} MiB max RSS\n", (out_dir / "steer_eval.md").read_text()]

    corr_dir = run / "steer_eval_sample"
    wall, rss, _ = timed([exe, "steer-eval", "--run", str(run), "--features", f"sample:{args.sample}",
                          "--methods", "add", "--out", str(corr_dir)])
    res = json.loads((corr_dir / "steer_eval.json").read_text())
    s = res.get("steerability", {})
    lines += [f"## 3. `sc-steer steer-eval --run {run} --features sample:{args.sample} --methods add`: {wall:.0f} s\n",
              f"Spearman rank correlation of the output score with the add method's concept C at matched cost: "
              f"{s.get('spearman_C', float('nan')):.3f}; with H: {s.get('spearman_H', float('nan')):.3f}; with the "
              f"raw concept gain averaged over the coefficient grid: {s.get('spearman_gain', float('nan')):.3f} "
              f"({s.get('n', 0)} features)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.save:
        Path(args.save).write_text(report)


if __name__ == "__main__":
    main()
