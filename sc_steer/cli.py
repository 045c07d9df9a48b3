"""The ``sc-steer`` command line: parse arguments, call the library, say where results went.

Problems with the user's input (``ScSteerError``) print one ``error:`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ScSteerError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (shipped), a local folder or a hub id (default: demo)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (default: float32)")
    p.add_argument("--remote", choices=["ndif", "local"], help="run traces on NDIF (needs NDIF_API_KEY), or "
                   "through nnsight's remote serialisation path locally")


def _open(args):
    from .models import open_model

    remote = {"ndif": True, "local": "local", None: False}[args.remote]
    return open_model(args.model, device=args.device, dtype=args.dtype, remote=remote)


def cmd_collect(args) -> None:
    from .activations import collect

    lm = _open(args)
    manifest = collect(lm, args.sites, args.data, args.out, ctx=args.ctx, batch_size=args.batch_size,
                       max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, store_dtype=args.store_dtype,
                       packing=args.packing, prepend_bos=not args.no_bos, field=args.field, split=args.split)
    norms = ", ".join(f"{s} {v['mean_norm']:.2f}" for s, v in manifest["sites"].items())
    print(f"collected {manifest['n_tokens']:,} tokens x {len(manifest['sites'])} sites "
          f"in {len(manifest['shards'])} shards -> {args.out}")
    print(f"mean activation norm: {norms}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sc-steer", description="sparse autoencoders on LM activations: "
                                 "collect, train, interpret, graph, steer")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect residual-stream (or MLP / attention) activations to disk")
    _add_model_args(p)
    p.add_argument("--data", default="demo", help="demo, demo:heldout, a .txt/.jsonl(.gz) file, a folder, "
                   "or hf:NAME[:CONFIG]:SPLIT (default: demo)")
    p.add_argument("--field", default="text", help="JSONL / dataset text field (default: text)")
    p.add_argument("--split", default="file", choices=["file", "line", "paragraph"],
                   help="how a text file is cut into documents (default: file)")
    p.add_argument("--sites", default="resid_post.*", help="comma-separated sites, e.g. resid_post.*, "
                   "resid_post.0-3,mlp_out.2 (default: resid_post.*)")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--ctx", type=int, default=256, help="context length in tokens, BOS included (default: 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, help="stop after this many stored tokens")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens per shard file (default: 65536)")
    p.add_argument("--store-dtype", help="float32, float16 or bfloat16 (default: the model's dtype)")
    p.add_argument("--packing", default="pad", choices=["pad", "pack"],
                   help="pad: one document per row group; pack: concatenate documents (default: pad)")
    p.add_argument("--no-bos", action="store_true", help="do not start rows with BOS")
    p.set_defaults(func=cmd_collect)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ScSteerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
