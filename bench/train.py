"""SAE training speed, side by side in one run: sc-steer's trainer step against a plain-torch step, the
machine's matmul peak, and whether a step gets dearer as a run goes on.

    OMP_NUM_THREADS=1 python bench/train.py                      # CPU: the small and the demo shape
    OMP_NUM_THREADS=1 python bench/train.py --shape wide         # d_in 256, d_sae 4096, batch 4096
    python bench/train.py --device cuda --shape 7b --autocast    # GPU, bf16

Shapes (TopK): ``small`` d_in 128, 1,024 latents, k 2, batch 1,024 (the size synthetic-data studies
use); ``demo`` d_in 256, 2,048 latents, k 32, batch 4,096 (one site of ``sc-steer demo``); ``wide``
d_in 256, 4,096 latents, k 32, batch 4,096; ``7b`` d_in 4096, 65,536 latents, k 64, batch 4,096.

Per shape, timed in turns (A B A B ...) so drift hits both alike, medians:

* sc-steer's step (``Trainer._step_site``: loss, backward, decoder-gradient projection, clipping, Adam,
  renormalisation, dead-latent bookkeeping) against ``bench/common.py``'s plain-torch step (dense
  encoder, top-k, dense decoder, MSE, backward, Adam), without AuxK and with a tenth of the latents
  dead (AuxK at its full k_aux = d_in / 2 in both);
* dense-equivalent FLOP/s (10 * batch * d_in * d_sae per step) against the matmul peak measured in
  this run (the sparse decoder lets TopK pass it);
* growth (CPU shapes): ``train_sae`` on synthetic superposition data for ``--run-steps`` steps, the
  median step time of the first and of the last tenth. AuxK's top-k scans the dead latents, so a step
  costs a little more as more of them die; the plain step, which scans every latent, is timed with the
  run's final dead latents beside it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import dead_mask, interleaved, plain_step_fn, sync
from sc_steer.sae.config import config_from_dict
from sc_steer.sae.sources import tensor_source
from sc_steer.sae.toy import make_toy_data
from sc_steer.sae.train import Trainer

SHAPES = {"small": dict(d_in=128, d_sae=1024, k=2, batch=1024), "demo": dict(d_in=256, d_sae=2048, k=32, batch=4096),
          "wide": dict(d_in=256, d_sae=4096, k=32, batch=4096), "7b": dict(d_in=4096, d_sae=65536, k=64, batch=4096)}


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(torch.device(device))
        t = time.perf_counter()
        a @ b
        sync(torch.device(device))
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def trainer_for(shape: dict, device: str, autocast: bool, tokens: int, architecture: str = "topk") -> Trainer:
    cfg = config_from_dict({"sites": ["x"], "batch_size": shape["batch"], "tokens": tokens, "autocast": autocast,
                            "checkpoint_every": 1 << 30, "log_every": 1 << 30,
                            "sae": {"architecture": architecture, "d_sae": shape["d_sae"], "k": shape["k"]}})
    x = torch.randn(shape["batch"] * 4, shape["d_in"])
    return Trainer(cfg, tensor_source({"x": x}, shape["batch"], 0), tempfile.mkdtemp(prefix="sc_steer_bench_"),
                   {"x": {"d": shape["d_in"], "mean_norm": float(x.norm(dim=-1).mean())}}, device=device,
                   progress=False)


def step_pair(shape: dict, device: str, autocast: bool, auxk: bool, repeats: int) -> tuple[float, float]:
    """(sc-steer's step, the plain step) in seconds, interleaved medians, on the same three batches."""
    dev = torch.device(device)
    tr = trainer_for(shape, device, autocast, 1 << 40)
    stream = tr.source(0)
    first = next(stream)
    tr._init_states(first)
    st = tr.states["x"]
    if auxk:
        st.since_fired.masked_fill_(dead_mask(shape["d_sae"], dev), float(1 << 40))
    batches = [b["x"].to(dev) for b in (first, next(stream), next(stream))]
    parts = tr._step_site(st, batches[0])
    assert ("auxk" in parts) == auxk, "AuxK is not in the state this comparison asks for"
    plain = plain_step_fn("topk", shape["d_in"], shape["d_sae"], shape["k"], dev, autocast, auxk)
    i = [0]

    def ours():
        tr._step_site(st, batches[i[0] % 3])
        tr.step += 1
        i[0] += 1

    def theirs():
        plain(batches[i[0] % 3] * st.scale)

    return tuple(interleaved([ours, theirs], dev, repeats=repeats, warmup=2))


def growth(shape: dict, steps: int, seed: int = 0) -> tuple[float, float, int, float]:
    """A whole ``train_sae`` run on synthetic data: median ms of the first and of the last tenth of its
    steps, how many latents were dead (AuxK on) at the end, and the plain step's ms with those dead."""
    x, _ = make_toy_data(shape["batch"] * 50, shape["d_in"], shape["d_sae"], shape["k"], seed=seed)
    tr = trainer_for(shape, "cpu", False, shape["batch"] * steps)
    tr.source = tensor_source({"x": x}, shape["batch"], seed)
    times = []
    step = tr._step_site

    def timed_step(st, xb):
        t = time.perf_counter()
        out = step(st, xb)
        times.append(time.perf_counter() - t)
        return out

    tr._step_site = timed_step
    tr.run()
    tenth = max(1, len(times) // 10)
    dead = tr.states["x"].since_fired > tr.cfg.resolved_dead_tokens()
    plain = plain_step_fn("topk", shape["d_in"], shape["d_sae"], shape["k"], torch.device("cpu"), False,
                          bool(dead.any()), dead)
    xb = x[:shape["batch"]]
    t_plain = interleaved([lambda: plain(xb)], torch.device("cpu"), repeats=5, warmup=1)[0]
    return (1e3 * statistics.median(times[:tenth]), 1e3 * statistics.median(times[-tenth:]), int(dead.sum()),
            1e3 * t_plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", action="append", choices=list(SHAPES), help="repeat for several (default: small, demo)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--run-steps", type=int, default=400, help="steps of the growth run (CPU shapes)")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--peak-n", type=int, default=None, help="square matmul size for the peak (default 2048 CPU, 8192 GPU)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    gpu = args.device.startswith("cuda")
    peak_dtype = torch.bfloat16 if args.autocast else torch.float32
    peak = matmul_peak(args.device, peak_dtype, args.peak_n or (8192 if gpu else 2048), 5)
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; {'bf16 autocast' if args.autocast else 'fp32'}; matmul peak "
          f"({str(peak_dtype).removeprefix('torch.')}): {peak / 1e9:,.1f} GFLOP/s")
    print("| shape | AuxK | sc-steer ms/step | plain ms/step | sc-steer / plain | sc-steer dense-equivalent % of peak |")
    print("|---|---|---|---|---|---|")
    for key in args.shape or ["small", "demo"]:
        shape = SHAPES[key]
        flops = 10 * shape["batch"] * shape["d_in"] * shape["d_sae"]
        for auxk in (False, True):
            ours, plain = step_pair(shape, args.device, args.autocast, auxk, args.repeats)
            print(f"| {key} | {'a tenth dead' if auxk else 'off'} | {1e3 * ours:,.1f} | {1e3 * plain:,.1f} "
                  f"| {ours / plain:.2f} | {100 * flops / ours / peak:.0f}% |", flush=True)
    if not gpu:
        for key in args.shape or ["small", "demo"]:
            if key in ("small", "demo"):
                first, last, dead, plain = growth(SHAPES[key], args.run_steps)
                print(f"growth, {key} shape, {args.run_steps} steps of train_sae on synthetic data: first tenth "
                      f"{first:.1f} ms/step, last tenth {last:.1f} ms/step ({last / first:.2f}x); {dead} latents dead "
                      f"at the end, where the plain step takes {plain:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
