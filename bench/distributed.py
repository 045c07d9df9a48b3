"""Scaling with torchrun: collection and SAE training tokens/s with 1 and N processes, side by side.

    python bench/distributed.py                          # CPU: 1 vs 2 processes (gloo), demo model
    python bench/distributed.py --device cuda --procs 1,8   # GPUs: NCCL, one GPU per process

Each configuration runs as its own ``torchrun --standalone`` job of this script in worker mode; a
worker times only the library call (``collect``, ``train_from_store``) between two barriers, so
interpreter and model start-up are left out. Training reads the collection the 1-process collect
wrote (all jobs train on the same tokens). Tokens/s are tokens through every site: collected at all
sites, or fed to every site's SAE (training on the demo: 4 SAEs of 2,048 latents, batch 4,096).

On CPU each process is given one thread (``OMP_NUM_THREADS=1``), so N processes use N cores: the
speed-up is that of more cores used, which is what a user with a multi-core machine gets.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    from sc_steer import distributed
    from sc_steer.activations import collect
    from sc_steer.models import open_model
    from sc_steer.pipeline import train_from_store
    from sc_steer.sae.config import config_from_dict

    dist, device = distributed.from_env(args.device)
    try:
        if args.job == "collect":
            lm = open_model(args.model, device=device)
            dist.barrier("start")
            t = time.perf_counter()
            m = collect(lm, args.sites, args.data, args.out, ctx=256, batch_size=16, max_tokens=args.tokens,
                        progress=False, dist=dist)
            dist.barrier("end")
            n, n_sites = m["n_tokens"] * len(m["sites"]), len(m["sites"])
        else:
            cfg = config_from_dict({"sites": [args.sites], "batch_size": 4096, "tokens": args.tokens,
                                    "checkpoint_every": 1 << 30, "sae": {"expansion": 8, "k": 32}})
            dist.barrier("start")
            t = time.perf_counter()
            train_from_store(args.activations, cfg, args.out, device=device, progress=False, dist=dist,
                             parallel=args.job if dist.active else None)
            dist.barrier("end")
            n_sites = len(json.loads((Path(args.out) / "run.json").read_text())["sites"])
            n = cfg.steps * cfg.batch_size * n_sites   # every SAE sees every global batch, whatever the split
        seconds = time.perf_counter() - t
        if dist.is_main:
            Path(args.result).write_text(json.dumps({"seconds": seconds, "activations": n, "sites": n_sites}))
    finally:
        distributed.shutdown()


def launch(procs: int, job: str, extra: list[str], result: Path, threads: str) -> dict:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(procs), __file__, "--worker", "--job", job,
           "--result", str(result), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{job} with {procs} processes failed:\n{r.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="1,2", help="process counts to compare (default 1,2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo:heldout")
    ap.add_argument("--sites", default="resid_post.*")
    ap.add_argument("--collect-tokens", type=int, default=100_000)
    ap.add_argument("--train-tokens", type=int, default=163_840)
    ap.add_argument("--threads", default="1", help="OMP_NUM_THREADS per process (default 1)")
    ap.add_argument("--out", help="also write the table here (Markdown)")
    # worker mode (run by torchrun)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--activations", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", dest="out_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.out = args.out_dir
        return worker(args)

    procs = [int(p) for p in args.procs.split(",")]
    common = ["--device", args.device, "--model", args.model, "--data", args.data, "--sites", args.sites]
    rows, done = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "acts-1"
        for job in ("collect", "layers", "data"):
            for n in procs:
                out = tmp / f"{job}-{n}"
                if job == "collect":
                    extra = ["--tokens", str(args.collect_tokens), "--out-dir", str(out)]
                else:
                    extra = ["--tokens", str(args.train_tokens), "--activations", str(base), "--out-dir", str(out)]
                if job == "data" and n == 1 and ("layers", 1) in done:
                    r = done[("layers", 1)]   # one process is one process: not split, measured once
                else:
                    r = launch(n, job, common + extra, tmp / "result.json", args.threads)
                done[(job, n)] = r
                if job == "collect" and n == procs[0]:
                    shutil.move(out, base)
                else:
                    shutil.rmtree(out, ignore_errors=True)
                rows.append((job, n, r["activations"] / r["seconds"] / r["sites"], r["seconds"]))
                print(f"{job:8s} {n} processes: {rows[-1][2]:,.0f} tokens/s x {r['sites']} sites "
                      f"({r['seconds']:.1f} s)", flush=True)
    first = {job: tps for job, n, tps, _ in rows if n == procs[0]}
    what = {"collect": "collect (all sites, to disk)", "layers": "train --parallel layers",
            "data": "train --parallel data"}
    lines = [f"device {args.device}, {args.threads} thread(s) per process, model {args.model}, sites {args.sites}; "
             "tokens/s: tokens through every site (collected, or fed to every SAE)",
             "", "| job | processes | tokens/s | seconds | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {what[job]} | {n} | {tps:,.0f} | {s:.1f} | {tps / first[job]:.2f}x |" for job, n, tps, s in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
