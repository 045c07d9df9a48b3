"""SAE training throughput against the machine's measured matmul peak, side by side in one run.

    OMP_NUM_THREADS=1 python bench/train.py                   # CPU: d_in 256, d_sae 4096, batch 4096
    python bench/train.py --device cuda --d-in 4096 --d-sae 65536 --batch 4096 --autocast   # GPU, bf16

Dense-equivalent work per step is 10 * batch * d_in * d_sae FLOPs (encoder and decoder forward, and
their three backward matmuls counted as dense). The peak is the best of repeated square matmuls of
the same dtype on the same device, measured in this run. Steps run the real trainer step (loss,
backward, decoder-gradient projection, clipping, Adam, renormalisation, dead-latent bookkeeping).

TopK trains with a sparse decoder (only k of d_sae rows per token), so its dense-equivalent rate can
exceed the matmul peak. For honesty the run also times the same step with the dense decoder (the
base-class forward) and prints the FLOPs actually executed.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from sc_steer.sae.base import SAE
from sc_steer.sae.config import config_from_dict
from sc_steer.sae.sources import tensor_source
from sc_steer.sae.train import Trainer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--architecture", default="topk")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--peak-n", type=int, default=None, help="square matmul size for the peak (default 2048 CPU, 8192 GPU)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    gpu = args.device.startswith("cuda")
    peak_dtype = torch.bfloat16 if args.autocast else torch.float32
    peak_n = args.peak_n or (8192 if gpu else 2048)

    cfg = config_from_dict({"sites": ["x"], "batch_size": args.batch, "tokens": args.batch * (args.steps + 3),
                            "autocast": args.autocast, "checkpoint_every": 1 << 30, "log_every": 1 << 30,
                            "sae": {"architecture": args.architecture, "d_sae": args.d_sae, "k": args.k}})
    n_data = args.batch * 4
    x = torch.randn(n_data, args.d_in)
    trainer = Trainer(cfg, tensor_source({"x": x}, args.batch, 0), "/tmp/sc_steer_bench_train",
                      {"x": {"d": args.d_in, "mean_norm": float(x.norm(dim=-1).mean())}}, device=args.device,
                      progress=False)
    stream = trainer.source(0)
    first = next(stream)
    trainer._init_states(first)
    st = trainer.states["x"]
    batches = [b["x"].to(args.device) for b in (first, next(stream), next(stream))]

    def steps(n: int) -> float:
        sync(args.device)
        t = time.perf_counter()
        for i in range(n):
            trainer._step_site(st, batches[i % len(batches)])
            trainer.step += 1
        sync(args.device)
        return time.perf_counter() - t

    def dense_steps(n: int) -> float:
        sae = st.sae
        fast = type(sae).train_forward
        sae.train_forward = lambda x, inputs: SAE.train_forward(sae, x, inputs)  # the dense reference path
        try:
            return steps(n)
        finally:
            sae.train_forward = fast.__get__(sae)

    steps(2)  # warm-up
    peak_before = matmul_peak(args.device, peak_dtype, peak_n, 5)
    dt = steps(args.steps)
    dt_dense = dense_steps(args.steps) if args.architecture == "topk" else None
    peak_after = matmul_peak(args.device, peak_dtype, peak_n, 5)
    peak = max(peak_before, peak_after)
    flops = 10 * args.batch * args.d_in * args.d_sae * args.steps
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; {args.architecture} SAE d_in={args.d_in} d_sae={args.d_sae} k={args.k} "
          f"batch={args.batch}, {'bf16 autocast' if args.autocast else 'fp32'}")
    print(f"matmul peak ({str(peak_dtype).removeprefix('torch.')}, {peak_n}^3): {peak / 1e9:,.1f} GFLOP/s")
    print(f"SAE training: {dt / args.steps * 1e3:,.1f} ms/step, {args.batch * args.steps / dt:,.0f} tokens/s, "
          f"{flops / dt / 1e9:,.1f} dense-equivalent GFLOP/s")
    print(f"fraction of matmul peak: {100 * flops / dt / peak:.1f}%  (target >= 60%)")
    if dt_dense is not None:
        executed = (4 * args.batch * args.d_in * args.d_sae + 6 * args.batch * args.k * args.d_in) * args.steps
        print(f"  executed FLOPs (dense encoder, sparse decoder): {executed / dt / 1e9:,.1f} GFLOP/s "
              f"= {100 * executed / dt / peak:.1f}% of peak")
        print(f"dense-decoder reference step: {dt_dense / args.steps * 1e3:,.1f} ms/step, "
              f"{100 * flops / dt_dense / peak:.1f}% of peak; sparse decoder speed-up {dt_dense / dt:.2f}x")


if __name__ == "__main__":
    main()
