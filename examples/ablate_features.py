"""Ablate SAE features on the demo model and report what changes downstream.

    sc-steer demo --out runs/demo            # once: trains and interprets the demo SAEs
    python examples/ablate_features.py --run runs/demo

Picks the most active layer-1 feature on the prompts, zero-ablates it, and reports its effect on the
layer-2 features it moves most and on next-token predictions; then clamps it to twice its max.
"""
from __future__ import annotations

import argparse

import torch

from sc_steer import ScSteerError, open_model
from sc_steer.interpret import load_unit
from sc_steer.graph.experiments import Ablation, ablation_experiment
from sc_steer.graph.measure import measure_pair, source_means
from sc_steer.data import iter_batches, iter_rows, pad_token_id
from sc_steer.rundir import load_run_saes

PROMPTS = ["Ge1:3 And God said, Let there be light: and there was light.",
           "Ps23:1 The LORD is my shepherd; I shall not want.",
           "HAMLET.\nTo be, or not to be, that is the question:",
           "thou art more lovely and more temperate, and thy summer's lease hath all too short a date"]


def label(run, layer: int, feature: int) -> str:
    try:
        return load_unit(run, f"resid_post.{layer}", feature)["label"]
    except ScSteerError:  # the run has not been interpreted
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--layer", type=int, default=1)
    args = ap.parse_args()
    lm = open_model("demo")
    saes = load_run_saes(args.run)
    n = args.layer
    batches = list(iter_batches(iter_rows(PROMPTS, lm.tokenizer, 64), 8, 64, pad_token_id(lm.tokenizer)))
    means, fires = source_means(lm, n, saes[f"resid_post.{n}"], batches)
    feature = int(means.argmax())
    pair = measure_pair(lm, n, saes[f"resid_post.{n}"], saes[f"resid_post.{n + 1}"], batches, [feature])
    targets = [(n + 1, int(j)) for j in pair.effect[0].abs().topk(5).indices]
    print(f"source: L{n}/F{feature} ({label(args.run, n, feature)}), mean activation {float(means[feature]):.3f}")
    for ablation in (Ablation(n, feature), Ablation(n, feature, mode="clamp", value=2 * float(means.max()))):
        rep = ablation_experiment(lm, saes, PROMPTS, [ablation], targets=targets)
        print(f"\n{ablation.mode} ablation: KL(clean || ablated) per position = {rep['kl']:.4f}")
        for name, t in rep["targets"].items():
            layer, feat = (int(x[1:]) for x in name.split("/"))
            print(f"  {name:>9} ({label(args.run, layer, feat)[:30]}): {t['clean']:.3f} -> {t['ablated']:.3f}")
        print("  next tokens promoted:  ", ", ".join(f"{t!r} {d:+.2f}" for t, d in rep["promoted"][:6]))
        print("  next tokens suppressed:", ", ".join(f"{t!r} {d:+.2f}" for t, d in rep["suppressed"][:6]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
