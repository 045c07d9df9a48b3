"""One demo site's SAE trained with the demo's recipe and chosen overrides, then FVU and CE recovered.

    sc-steer collect --model demo --data demo --max-tokens 1200000 --out runs/demo-acts   # once
    OMP_NUM_THREADS=1 python bench/demo_site.py --activations runs/demo-acts \
        --site resid_post.3 --set sae.lr=4e-3 --set dead_tokens=6144

How the demo's training settings were chosen (``bench/toy_recovery_results.md``): everything as
``sc-steer demo --full`` trains (``demo/run.py``: ``DEMO_TRAIN`` with the ``FULL`` budget) except the
``--set`` overrides (``key=value`` for the run, ``sae.key=value`` for the SAE), evaluated like
``sc-steer eval`` on held-out text.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch


def main() -> None:
    from sc_steer.models import open_model
    from sc_steer.demo.run import DEMO_TRAIN, FULL
    from sc_steer.pipeline import train_from_store
    from sc_steer.sae.config import config_from_dict
    from sc_steer.evaluate import evaluate_saes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", required=True)
    ap.add_argument("--site", default="resid_post.3")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", default="demo:heldout")
    ap.add_argument("--max-tokens", type=int, default=50_000)
    args = ap.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cfg = copy.deepcopy(DEMO_TRAIN) | {"sites": [args.site], "checkpoint_every": 1 << 30,
                                       "tokens": FULL["train_tokens"]}
    for item in args.set:
        key, _, value = item.partition("=")
        target, key = (cfg["sae"], key[4:]) if key.startswith("sae.") else (cfg, key)
        target[key] = json.loads(value)
    t = time.time()
    with tempfile.TemporaryDirectory() as out:
        saes = train_from_store(args.activations, config_from_dict(cfg), out, progress=False)
    r = evaluate_saes(open_model("demo"), saes, args.data, ctx=256, batch_size=8, max_tokens=args.max_tokens,
                      progress=False)[args.site]
    print(f"{args.site} {' '.join(args.set) or '(demo recipe)'}: FVU {r['fvu']:.4f}, CE recovered "
          f"{r['ce_recovered']:.1%}, L0 {r['l0']:.1f}, dead {r['dead_frac']:.2%} ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
