"""Ground-truth recovery: SAEs trained on sparse combinations of known directions in superposition.

    OMP_NUM_THREADS=1 python bench/toy_recovery.py

Data: ``n_features`` random unit directions in ``d`` dimensions (more directions than dimensions),
each sample the sum of ``active`` of them with magnitudes in [0.5, 1.5]. Dictionary size = the
number of true directions. Score: mean over true directions of the best cosine with a decoder row
(MMCS); target >= 0.95 for TopK and ReLU + L1. Three seeds each.
"""
from __future__ import annotations

import statistics
import time

import torch

from sc_steer.sae.toy import make_toy_data, mean_max_cosine
from sc_steer.sae.train import train_sae

SETTINGS = [  # (d, n_features, active, samples)
    (64, 256, 4, 60_000),
    (128, 1024, 8, 120_000),
]
ARCHS = {"topk": {"k": None}, "relu": {"l1_coeff": 1.0}, "batchtopk": {"k": None}, "jumprelu": {"l0_coeff": 0.2}}


def main() -> None:
    torch.set_num_threads(1)
    print("| d | true dirs | active | architecture | MMCS (mean of 3 seeds) | min | L0 | FVU | s/run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, n_feat, active, n in SETTINGS:
        for arch, kw in ARCHS.items():
            kw = {k: (active if v is None else v) for k, v in kw.items()}
            scores, l0s, fvus, t0 = [], [], [], time.time()
            for seed in range(3):
                x, dirs = make_toy_data(n, d, n_feat, active, seed=seed)
                sae = train_sae(x, arch, d_sae=n_feat, tokens=8 * n, batch_size=1024, lr=3e-3, seed=seed, **kw)
                scores.append(mean_max_cosine(dirs, sae.W_dec.detach()))
                with torch.no_grad():
                    xe = x[:5000]
                    f = sae.encode(xe)
                    l0s.append(float((f > 0).sum(-1).float().mean()))
                    fvus.append(float(((sae.decode(f) - xe) ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum()))
            print(f"| {d} | {n_feat} | {active} | {arch} | {statistics.mean(scores):.4f} | {min(scores):.4f} "
                  f"| {statistics.mean(l0s):.1f} | {statistics.mean(fvus):.3f} | {(time.time() - t0) / 3:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
