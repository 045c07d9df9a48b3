"""Interpretation cost: the demo run's SAEs (and neuron baselines) over N tokens, time and peak RSS;
or one wide SAE's interpretation rate against the plain forward plus SAE encode.

    OMP_NUM_THREADS=2 python bench/interpret.py --run runs/demo --tokens 1000000
    OMP_NUM_THREADS=1 python bench/interpret.py --rate --d-sae 16384 --tokens 50000

Run ``sc-steer demo`` first. Peak RSS is the process's maximum resident set size (``sc_steer.usage.peak_rss_bytes``), which
includes the model, the SAEs and the token table; the time includes writing all outputs.

``--rate`` measures, in one process and over the same rows: the plain forward (the model's own
``forward``, no hooks) plus the SAE's encode of the site's activations, then ``interpret`` of that one
site with that SAE (TopK, ``--d-sae`` latents, initialised at random: the cost does not depend on what
the features mean), without and with the neuron baselines. It prints each rate and the ratio to the
reference; the read-out of every unit's record is timed apart.
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


def rate(args) -> None:
    """Interpretation of one wide SAE against the plain forward plus encode, side by side."""
    from sc_steer.data import collate, pad_token_id
    from sc_steer.interpret import features as feats
    from sc_steer.models import open_model
    from sc_steer.sae import SAEConfig, make_sae
    from sc_steer.sites import Site

    lm = open_model("demo")
    site = Site.parse(args.site)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(architecture="topk", d_in=lm.width(site), d_sae=args.d_sae, k=args.k))
    ctx, bs = 256, 16
    rows = feats.rows_upto(args.data, lm.tokenizer, ctx, args.tokens)
    n = sum(sum(r.keep) for r in rows)
    pad = pad_token_id(lm.tokenizer)

    def reference() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(rows), bs):
                b = collate(rows[i:i + bs], 0, ctx, pad)
                out = lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
                h = out.hidden_states[site.layer + 1][b.keep]
                sae.encode(h.float())
        return time.perf_counter() - t

    reads: list[float] = []
    real_read = feats._read

    def timed_read(*a, **kw):
        t = time.perf_counter()
        got = real_read(*a, **kw)
        reads.append(time.perf_counter() - t)
        return got

    feats._read = timed_read
    reference()                                   # warm-up (allocator, thread pools)
    t_ref = reference()
    results = {}
    for neurons in (False,) if args.no_neurons else (False, True):
        with tempfile.TemporaryDirectory() as out:
            reads.clear()
            t = time.perf_counter()
            feats.interpret(lm, {str(site): sae}, args.data, out, max_tokens=args.tokens, ctx=ctx, batch_size=bs,
                            neurons=neurons, progress=False)
            results[neurons] = (time.perf_counter() - t, sum(reads))
    print(f"demo model, {site}, TopK SAE with {args.d_sae:,} latents (k {args.k}), {n:,} tokens of {args.data!r}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"plain forward + SAE encode        : {n / t_ref:8,.0f} tokens/s")
    for neurons, (total, read) in results.items():
        what = "interpret, SAE + neuron baselines" if neurons else "interpret, SAE only             "
        print(f"{what}: {n / total:8,.0f} tokens/s = {t_ref / total:.2f}x the reference "
              f"(streaming pass {n / read:,.0f} tokens/s = {t_ref / read:.2f}x; read-out of the records "
              f"{total - read:.1f} s of {total:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--no-neurons", action="store_true")
    ap.add_argument("--rate", action="store_true", help="one wide SAE against the plain forward plus encode")
    ap.add_argument("--site", default="resid_post.1")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    if args.rate:
        return rate(args)
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
