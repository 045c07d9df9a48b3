"""Collection throughput against a plain transformers forward over the same batches, in one run.

    OMP_NUM_THREADS=1 python bench/collect.py                 # demo model, demo held-out text
    python bench/collect.py --model PATH --tokens 200000 --batch-size 32

Measured, alternating to share the machine's noise: (a) the plain ``model(input_ids, attention_mask)``
forward with logits, no hooks; (b) ``sc_steer.collect`` of every ``resid_post`` site to safetensors
shards on disk (tokenisation, the nnsight trace, gathering non-BOS tokens and writing all included).
Overhead = time(b) / time(a) - 1; negative means collection is faster (it stops the forward after
the last requested block, so the final norm and unembedding are skipped). For transparency it also
times (c) an nnsight trace of the whole forward (logits computed) saving every site in memory: the
cost of tracing itself, without the early stop and without disk.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sc_steer import collect, open_model
from sc_steer.models import unwrap
from sc_steer.data import iter_batches, iter_documents, iter_rows, pad_token_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo:heldout")
    ap.add_argument("--tokens", type=int, default=65536, help="stored tokens per measurement")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    lm = open_model(args.model)
    sites = lm.sites("resid_post.*")
    work = Path(tempfile.mkdtemp(prefix="sc_steer_bench_"))
    try:
        # Find the batches collection will use for this token budget (same rows, same padding).
        rows = iter_rows(iter_documents(args.data), lm.tokenizer, args.ctx)
        batches, kept = [], 0
        for b in iter_batches(rows, args.batch_size, args.ctx, pad_token_id(lm.tokenizer)):
            batches.append(b)
            kept += int(b.keep.sum())
            if kept >= args.tokens:
                break
        n_in = sum(int(b.attention_mask.sum()) for b in batches)

        def plain() -> float:
            t = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
            return time.perf_counter() - t

        def ours(i: int) -> float:
            out = work / f"run{i}"
            t = time.perf_counter()
            collect(lm, sites, args.data, out, ctx=args.ctx, batch_size=args.batch_size, max_tokens=args.tokens,
                    progress=False)
            dt = time.perf_counter() - t
            shutil.rmtree(out)
            return dt

        def traced_full() -> float:
            import nnsight

            envoys = [lm.envoy(s) for s in sites]
            t = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    with lm.trace({"input_ids": b.input_ids, "attention_mask": b.attention_mask}):
                        _ = [nnsight.save(unwrap(e.output)) for e in envoys]
                        nnsight.save(lm.nn.output)
            return time.perf_counter() - t

        plain(), ours(-1), traced_full()  # warm-up
        t_plain, t_ours, t_traced = [], [], []
        for i in range(args.repeats):
            t_plain.append(plain())
            t_ours.append(ours(i))
            t_traced.append(traced_full())
        tp, to, tt = (statistics.median(t) for t in (t_plain, t_ours, t_traced))
        print(f"model {lm.name} ({lm.n_layers} layers, d={lm.d_model}), {len(batches)} batches of "
              f"{args.batch_size}x{args.ctx}, {n_in:,} input tokens, {kept:,} stored tokens, "
              f"{len(sites)} sites, torch threads {torch.get_num_threads()}")
        print(f"plain transformers forward : {n_in / tp:10,.0f} tok/s  (median of {args.repeats}: {tp:.2f} s)")
        print(f"sc-steer collect to disk   : {n_in / to:10,.0f} tok/s  (median of {args.repeats}: {to:.2f} s)")
        print(f"nnsight full-forward trace : {n_in / tt:10,.0f} tok/s  (median of {args.repeats}: {tt:.2f} s, "
              "every site saved in memory, logits computed, no disk)")
        print(f"collection overhead vs plain forward: {100 * (to / tp - 1):+.1f}%  (target <= +15%)")
        print(f"tracing overhead (full forward, no early stop, no disk): {100 * (tt / tp - 1):+.1f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
