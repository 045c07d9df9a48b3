"""Measure the trained demo model and write its report (held-out perplexity, unigram baseline, samples).

    python -m sc_steer.demo.report --work /tmp/demo_lm > sc_steer/demo/model/TRAINING.md

Perplexity is over the whole held-out split, cut into BOS-prefixed rows of 256 tokens; BOS targets
are not scored. The unigram baseline is the add-one-smoothed token distribution of the training
split, scored on the same held-out targets. Also draws the training curve next to the model.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..models import demo_model_path
from .train_lm import BOS, evaluate

PROMPTS = ["Ge1:1 In the beginning", "HAMLET.\nTo be, or not to be", "cat, true cat (noun):"]


def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = heldout[heldout != BOS].astype(np.int64)
    return float(-logp[targets].mean())


def plot_curve(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["loss"] for r in log], lw=0.6, alpha=0.6, label="train (batch)")
    val = [r for r in log if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out")
    ax.set_xlabel("step (4,096 tokens each)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_ylim(top=min(10, max(r["loss"] for r in log)))
    ax.legend()
    ax.set_title("sc-steer demo model training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the train_lm work folder (streams, log)")
    ap.add_argument("--model", type=Path, default=demo_model_path())
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    train, held = np.load(args.work / "train.npy"), np.load(args.work / "heldout.npy")
    loss = evaluate(model, held, 256, max_rows=None)
    uni = unigram_loss(train, held, len(tok))
    n_params = sum(p.numel() for p in model.parameters())
    log = [json.loads(line) for line in (args.work / "log.jsonl").open()]
    plot_curve(log, args.model / "training_curve.png")
    size_mb = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 1e6
    print("# Demo model: training report\n")
    print(f"* parameters: {n_params:,} ({size_mb:.1f} MB safetensors, fp32)")
    print(f"* trained tokens: {log[-1]['step'] * 16 * 256:,} ({log[-1]['step']} steps of 16 x 256) "
          f"on {len(train):,} training tokens")
    print(f"* held-out tokens scored: {int((held != BOS).sum()):,}")
    print(f"* **held-out perplexity: {math.exp(loss):.1f}** (cross-entropy {loss:.3f} nats)")
    print(f"* unigram baseline perplexity: {math.exp(uni):.1f} (cross-entropy {uni:.3f} nats)")
    print("\n![training curve](training_curve.png)\n")
    print("## Samples\n\nTemperature 0.8, top-k 40, seed 0, 60 new tokens.\n")
    for prompt in PROMPTS:
        torch.manual_seed(0)
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                             pad_token_id=tok.pad_token_id)
        print("```text\n" + tok.decode(out[0], skip_special_tokens=True) + "\n```\n")


if __name__ == "__main__":
    main()
