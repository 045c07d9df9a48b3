"""Ground-truth recovery: SAEs trained on sparse combinations of known directions in superposition.

    OMP_NUM_THREADS=1 python bench/toy_recovery.py [--family uniform|heavy|all] [--seeds 3]

Score: for each true direction the best cosine with a decoder row, averaged (MMCS), plus the share
of true directions recovered above 0.9. Every row is the mean of three seeds (data and SAE seeded
together).

* ``uniform``: exactly ``active`` directions per sample, each equally likely, magnitudes in
  [0.5, 1.5] (the easy case).
* ``heavy``: 256 directions in 128 dimensions; direction i fires with probability proportional to
  ``decay**i`` (5 active per sample on average, so the most frequent fires on ~1 sample in 10 and
  the rarest on ~1 in 1,700 at decay 0.98), coefficients uniform in [0, 1]; optionally in
  correlated groups of 4 (Gaussian copula, correlation 0.5). Dictionaries of 1x and 2x the true
  count. Our trainer runs with its defaults only (``train_sae(x, arch, d_sae=n, k=5)``; ReLU and
  JumpReLU with their own defaults too). Beside it, ``bench/reference_topk.py``: a plain TopK + AuxK
  trainer written independently, on the same data and the same number of samples (batch 256).

Data and SAEs are seeded apart (``sae/toy.py``: DATA_SEED_OFFSET); until they were, an SAE of seed s
started from the true directions of the data of seed s and every row here was near 1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference_topk import train_plain_topk  # noqa: E402

from sc_steer.sae.toy import make_heavy_tailed_data, make_toy_data, max_cosines  # noqa: E402
from sc_steer.sae.train import MIN_STEPS, train_sae  # noqa: E402

UNIFORM = [(64, 256, 4, 60_000)]                         # (d, n_features, active, samples)
HEAVY = [  # (name, decay, correlation, dictionary sizes as multiples of the true count)
    ("decay 0.98", 0.98, 0.0, (1, 2)),
    ("decay 0.98, correlated", 0.98, 0.5, (1,)),
    ("decay 0.99", 0.99, 0.0, (1,)),
]
HEAVY_SHAPE = (128, 256, 5, 100_000)                     # d, n_features, mean active, samples
ARCHS = ("topk", "batchtopk", "relu", "jumprelu")


def score(sae_dec: torch.Tensor, encode, decode, x: torch.Tensor, dirs: torch.Tensor) -> dict[str, float]:
    mc = max_cosines(dirs, sae_dec)
    with torch.no_grad():
        xe = x[:20_000]
        f = encode(xe)
        fvu = float(((decode(f) - xe) ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum())
        return {"mmcs": float(mc.mean()), "rec": float((mc > 0.9).float().mean()),
                "l0": float((f > 0).sum(-1).float().mean()), "fvu": fvu,
                "dead": float((f > 0).sum(0).eq(0).sum())}


def ours(x, dirs, arch, n, k, seed):
    sae = train_sae(x, arch, d_sae=n, k=k, seed=seed)
    return score(sae.W_dec.detach(), sae.encode, sae.decode, x, dirs)


def reference(x, dirs, n, k, seed, samples):
    ref = train_plain_topk(x, n, k, steps=samples // 256, batch=256, seed=seed)
    return score(ref.dec.detach(), ref.codes, lambda f: f @ ref.dec + ref.b_dec, x, dirs)


def row(label: str, results: list[dict], seconds: float) -> str:
    m = {key: statistics.mean(r[key] for r in results) for key in results[0]}
    lo = min(r["mmcs"] for r in results)
    return (f"| {label} | {m['mmcs']:.4f} | {lo:.4f} | {m['rec']:.1%} | {m['l0']:.1f} | {m['fvu']:.3f} "
            f"| {m['dead']:.1f} | {seconds / len(results):.0f} |")


HEADER = ("| data | dictionary | trainer | MMCS | min over seeds | recovered > 0.9 | L0 | FVU "
          "| never fire (20k samples) | s/run |\n|---|---|---|---|---|---|---|---|---|---|")


def run_uniform(seeds: int) -> None:
    print(HEADER.replace("| data | dictionary |", "| d, true dirs, active | dictionary |"))
    for d, n, active, samples in UNIFORM:
        for arch in ARCHS:
            t0, res = time.time(), []
            for seed in range(seeds):
                x, dirs = make_toy_data(samples, d, n, active, seed=seed)
                res.append(ours(x, dirs, arch, n, active, seed))
            print(row(f"{d}, {n}, {active} | 1x | {arch}", res, time.time() - t0), flush=True)


def run_heavy(seeds: int, archs=ARCHS, quick: bool = False, only: list[str] | None = None,
              only_mults: list[int] | None = None, reference_too: bool = True) -> None:
    d, n, active, samples = HEAVY_SHAPE
    print(HEADER)
    for name, decay, corr, mults in HEAVY[:1] if quick else HEAVY:
        if only and name not in only:
            continue
        mults = (1,) if quick else tuple(m for m in mults if not only_mults or m in only_mults)
        data = [make_heavy_tailed_data(samples, d, n, active, decay, seed=s, correlation=corr) for s in range(seeds)]
        for mult in mults:
            for arch in archs:
                t0 = time.time()
                res = [ours(x, dirs, arch, mult * n, active, s) for s, (x, dirs) in enumerate(data)]
                print(row(f"{name} | {mult}x | {arch}", res, time.time() - t0), flush=True)
            if not reference_too:
                continue
            t0 = time.time()
            budget = max(10 * samples, MIN_STEPS * 1024)   # the samples train_sae's defaults draw
            res = [reference(x, dirs, mult * n, active, s, budget) for s, (x, dirs) in enumerate(data)]
            print(row(f"{name} | {mult}x | plain reference (TopK)", res, time.time() - t0), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=("uniform", "heavy", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--quick", action="store_true", help="heavy-tailed: decay 0.98 at 1x only")
    ap.add_argument("--setting", action="append", choices=[h[0] for h in HEAVY],
                    help="heavy-tailed: only these data settings (to split the run over processes)")
    ap.add_argument("--mult", action="append", type=int, help="heavy-tailed: only these dictionary sizes")
    ap.add_argument("--no-reference", action="store_true", help="heavy-tailed: our trainer only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.family in ("uniform", "all"):
        run_uniform(args.seeds)
    if args.family in ("heavy", "all"):
        run_heavy(args.seeds, tuple(args.archs.split(",")), args.quick, args.setting, args.mult,
                  not args.no_reference)


if __name__ == "__main__":
    main()
