"""Feature-graph measurement: batched block-(n+1) ablation against one full forward per feature.

    OMP_NUM_THREADS=1 python bench/graph.py --run runs/demo --layer 1 --sources 64

Both compute the same edge set (every chosen source at layer n onto every layer-(n+1) feature, over
the same prompts) in one run; the script checks they agree within 1e-5 and prints the speed-up.
"""
from __future__ import annotations

import argparse
import time

import torch

from sc_steer.graph.measure import measure_pair, source_means
from sc_steer.graph.naive import naive_effects
from sc_steer.graph.run import prompt_batches
from sc_steer.models import open_model
from sc_steer.rundir import load_run_saes, read_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--prompts", default="demo:heldout")
    ap.add_argument("--max-prompts", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--sources", type=int, default=64, help="how many active source features")
    ap.add_argument("--select", default="random", choices=["random", "top"],
                    help="random active features (what `--sources active` graphs are made of) or the most active")
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args()
    lm = open_model(read_run(args.run)["model"])
    saes = load_run_saes(args.run, [f"resid_post.{args.layer}", f"resid_post.{args.layer + 1}"])
    a, b = saes[f"resid_post.{args.layer}"], saes[f"resid_post.{args.layer + 1}"]
    batches, _ = prompt_batches(lm, args.prompts, ctx=args.ctx, max_prompts=args.max_prompts, batch_size=16)
    means, fires = source_means(lm, args.layer, a, batches)
    active = torch.nonzero(fires > 0)[:, 0]
    n = min(args.sources, len(active))
    if args.select == "top":
        sources = active[means[active].topk(n).indices].sort().values
    else:
        sources = active[torch.randperm(len(active), generator=torch.Generator().manual_seed(0))[:n]].sort().values

    t = time.perf_counter()
    ours = measure_pair(lm, args.layer, a, b, batches, sources, chunk=args.chunk)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = naive_effects(lm, args.layer, a, b, batches, sources.tolist())
    t_naive = time.perf_counter() - t
    err = max(float((ours.effect[r] - ref[i][0]).abs().max()) for r, i in enumerate(sources.tolist()))
    err_pre = max(float((ours.pre_delta[r] - ref[i][2]).abs().max()) for r, i in enumerate(sources.tolist()))
    print(f"model {lm.name}, layer {args.layer} -> {args.layer + 1}: {len(sources)} {args.select} active sources "
          f"(of {len(active)}) x {b.cfg.d_sae} targets, "
          f"{ours.count:,} positions in {len(batches)} prompt batches ({args.max_prompts} prompts x <= {args.ctx} tokens)")
    print(f"naive (one full forward per feature): {t_naive:7.2f} s")
    print(f"batched block-(n+1) ablation        : {t_ours:7.2f} s  (also computes std, skip/through split)")
    print(f"speed-up: {t_naive / t_ours:.1f}x   max |effect difference| {err:.2e}, max |pre-activation difference| "
          f"{err_pre:.2e}  ({'OK' if max(err, err_pre) <= 1e-5 else 'MISMATCH'} at 1e-5)")


if __name__ == "__main__":
    main()
