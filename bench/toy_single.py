"""One cell of the heavy-tailed toy (bench/toy_recovery.py's decay 0.98, 1x data) with chosen settings:
how each default in bench/toy_recovery_results.md was compared.

    OMP_NUM_THREADS=1 python bench/toy_single.py relu --seed 0 --set l1_coeff=1.0 --set resample=true

``--set key=value`` (JSON values) goes to ``train_sae`` (fields of ``SAETrainConfig`` or
``TrainConfig``). Prints MMCS, the true directions recovered above 0.9, L0, latents that never fire on
20,000 samples and latents with a twin (decoder cosine > 0.9 with another).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sc_steer.sae.toy import make_heavy_tailed_data, max_cosines
from sc_steer.sae.train import train_sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch")
    ap.add_argument("--seed", type=int, default=0, help="data and SAE seed (as the benchmark)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    opts = {}
    for item in args.set:
        key, _, value = item.partition("=")
        opts[key] = json.loads(value)
    x, dirs = make_heavy_tailed_data(100_000, 128, 256, 5, 0.98, seed=args.seed)
    t = time.time()
    sae = train_sae(x, args.arch, d_sae=256, k=5, seed=args.seed, **opts)
    mc = max_cosines(dirs, sae.W_dec.detach())
    w = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    with torch.no_grad():
        f = sae.encode(x[:20_000])
    twins = int(((w @ w.T - 2 * torch.eye(len(w))).max(dim=1).values > 0.9).sum())
    print(f"{args.arch} seed {args.seed} {' '.join(args.set) or '(defaults)'}: MMCS {float(mc.mean()):.4f}, "
          f"recovered {int((mc > 0.9).sum())}/{len(mc)}, L0 {float((f > 0).sum(1).float().mean()):.2f}, "
          f"never fire {int(((f > 0).sum(0) == 0).sum())}, with a twin {twins} ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
