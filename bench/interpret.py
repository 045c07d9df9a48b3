"""Interpretation cost: the demo run's SAEs (and neuron baselines) over N tokens, time and peak RSS.

    OMP_NUM_THREADS=2 python bench/interpret.py --run runs/demo --tokens 1000000

Run ``sc-steer demo`` first. Peak RSS is the process's maximum resident set size (``sc_steer.usage.peak_rss_bytes``), which
includes the model, the SAEs and the token table; the time includes writing all outputs.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sc_steer.pipeline import interpret_run
from sc_steer.usage import peak_rss_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--no-neurons", action="store_true")
    args = ap.parse_args()
    rss0 = peak_rss_bytes() / 2**20
    work = Path(tempfile.mkdtemp(prefix="sc_steer_bench_interp_"))
    try:
        for name in ("run.json", "saes"):  # interpret a copy, so the run's own outputs stay as they are
            src = Path(args.run) / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
        t = time.perf_counter()
        summary = interpret_run(work, args.data, max_tokens=args.tokens, neurons=not args.no_neurons)
        dt = time.perf_counter() - t
        rss = peak_rss_bytes() / 2**20
        units = sum(s["n_units"] for s in summary["sets"].values())
        print(f"interpreted {units:,} units ({len(summary['sets'])} unit sets) over {summary['n_tokens']:,} tokens "
              f"of {args.data!r} with {torch.get_num_threads()} thread(s)")
        print(f"time: {dt:,.0f} s ({summary['n_tokens'] / dt:,.0f} tokens/s); peak RSS {rss:,.0f} MB "
              f"(at start {rss0:,.0f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
