"""The ``sc-steer`` command line: parse arguments, call the library, say where results went.

Problems with the user's input (``ScSteerError``) print one ``error:`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import validate
from .errors import ScSteerError
from .files import check_new_file


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the model (and the SAEs with it) runs: cpu, cuda, "
                   "cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="the model's dtype: float32, bfloat16, float16 or auto; "
                   "SAEs stay float32 (default: float32)")


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "demo") -> None:
    p.add_argument("--model", default=default, help="'demo' (shipped), a local folder or a hub id "
                   + ("(default: demo)" if default else "(default: the run's own model)"))
    _add_device_args(p)
    p.add_argument("--remote", choices=["ndif", "local"], help="run traces on NDIF (needs NDIF_API_KEY), or "
                   "through nnsight's remote serialisation path locally")


def _open(args):
    """The model named by --model, or else by the run's run.json, on --device in --dtype."""
    from .models import open_model
    from .rundir import read_run

    remote = {"ndif": True, "local": "local", None: False}[args.remote]
    model = args.model or read_run(args.run)["model"]
    return open_model(model, device=args.device, dtype=args.dtype, remote=remote)


def cmd_collect(args) -> None:
    from . import distributed
    from .activations import collect

    dist, device = distributed.from_env(args.device)
    args.device = str(device)
    lm = _open(args)
    manifest = collect(lm, args.sites, args.data, args.out, ctx=args.ctx, batch_size=args.batch_size,
                       max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, store_dtype=args.store_dtype,
                       packing=args.packing, prepend_bos=not args.no_bos, field=args.field, split=args.split,
                       dist=dist)
    if not dist.is_main:
        return
    norms = ", ".join(f"{s} {v['mean_norm']:.2f}" for s, v in manifest["sites"].items())
    print(f"collected {manifest['n_tokens']:,} tokens x {len(manifest['sites'])} sites "
          f"in {len(manifest['shards'])} shards -> {args.out}")
    print(f"mean activation norm: {norms}")


def _train_config(args):
    from .sae.config import TrainConfig, config_from_dict, load_config

    cfg = load_config(args.config) if args.config else TrainConfig()
    d = cfg.to_dict()
    for flag, key in (("sites", "sites"), ("tokens", "tokens"), ("batch_size", "batch_size"), ("seed", "seed"),
                      ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    for flag in ("architecture", "k", "expansion", "d_sae", "lr", "l1_coeff", "l0_coeff"):
        if getattr(args, flag) is not None:
            d["sae"][flag] = getattr(args, flag)
    return config_from_dict(d, where="--config and flags")


def cmd_train(args) -> None:
    from . import distributed
    from .pipeline import train_from_model, train_from_store
    from .rundir import sae_sites

    cfg = _train_config(args)
    dist, device = distributed.from_env(args.device)
    split = {"dist": dist, "parallel": args.parallel}
    if args.activations:
        saes = train_from_store(args.activations, cfg, args.out, resume=args.resume, device=device,
                                force=args.force, **split)
    else:
        args.device = str(device)
        lm = _open(args)
        saes = train_from_model(lm, args.data, cfg, args.out, ctx=args.ctx, resume=args.resume, device=lm.device,
                                force=args.force, **split)
    if dist.is_main:
        sites = sae_sites(args.out) if dist.active else list(saes)
        print(f"trained {len(sites)} SAEs -> {args.out}/saes/ ({', '.join(sites)}); "
              f"curves: {args.out}/training_curves.png" + (f" ({dist.world} processes, --parallel {args.parallel})"
                                                           if dist.active else ""))


def cmd_eval(args) -> None:
    from .pipeline import eval_run
    from .evaluate import markdown_table

    results = eval_run(args.run, args.data, lm=_open(args), max_tokens=args.max_tokens, batch_size=args.batch_size)
    print(markdown_table(results))
    print(f"-> {args.run}/eval.json, {args.run}/eval.md")


def cmd_interpret(args) -> None:
    from . import rundir
    from .pipeline import interpret_run

    sites = [x.strip() for x in args.sites.split(",")] if args.sites else None
    summary = interpret_run(args.run, args.data, lm=_open(args), max_tokens=args.max_tokens, sites=sites,
                            neurons=not args.no_neurons, top_n=args.top_n, window=args.window,
                            min_count=args.min_count)
    print((Path(args.run) / rundir.INTERPRET_MD).read_text())
    print(f"-> {args.run}/{rundir.FEATURES}/<site>.jsonl and .md, {args.run}/{rundir.NEURONS}/, "
          f"{args.run}/{rundir.BROWSER}/index.html, {args.run}/{rundir.SCORES_PNG} ({summary['n_tokens']:,} tokens)")


def cmd_graph(args) -> None:
    from .pipeline import graph_run

    lm = _open(args)
    layers = None
    if args.layers:
        lo, _, hi = args.layers.partition("-")
        try:
            layers = list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            layers = []
        if not layers:
            raise ScSteerError(f"--layers {args.layers!r}: expected N or N-M with N <= M (source layers)")
    sources = args.sources
    if sources and sources[0].isdigit():
        try:
            sources = [int(x) for x in sources.split(",")]
        except ValueError:
            raise ScSteerError(f"--sources {args.sources!r}: expected active, top:N, attr:N or feature ids "
                               "like 3,17,42") from None
    g, paths, corr = graph_run(args.run, args.prompts, args.out, lm=lm, layers=layers, sources=sources,
                               mode=args.mode, value=args.value, where=args.where, prune=args.prune,
                               amount=args.amount, rank_by=args.rank_by, attribute=not args.no_attribution,
                               ctx=args.ctx, max_prompts=args.max_prompts, name=args.name, force=args.force)
    print(f"graph: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges; attribution vs exact (Pearson): "
          + ", ".join(f"{k} {v:.3f}" for k, v in corr.items()))
    print("-> " + ", ".join(str(p) for p in paths.values()))


def _parse_interventions(args):
    from .steer import MODE_DOCS, Intervention, Recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe([])
    for mode, (value, _) in MODE_DOCS.items():
        for spec in getattr(args, mode) or []:
            parts = spec.split(":")
            need = 3 if value else 2
            if len(parts) != need or not parts[1].lstrip("-").isdigit():
                form = "SITE:FEATURE" + (":VALUE" if value else "")
                raise ScSteerError(f"--{mode} {spec!r}: expected {form}, e.g. resid_post.1:837" + (":8" if value else ""))
            try:
                coeff = float(parts[2]) if need == 3 else 0.0
            except ValueError:
                raise ScSteerError(f"--{mode} {spec!r}: {parts[2]!r} is not a number") from None
            recipe.interventions.append(Intervention(parts[0], int(parts[1]), mode, coeff, args.positions,
                                                     include_bos=args.include_bos))
    return recipe


def cmd_steer(args) -> None:
    import textwrap

    from .rundir import load_run_saes
    from .steer import MODE_DOCS, generate

    recipe = _parse_interventions(args)
    if not recipe.interventions:
        raise ScSteerError(f"nothing to steer with: give {'/'.join('--' + m for m in MODE_DOCS)} or --recipe")
    if args.save_recipe:
        check_new_file(args.save_recipe, "--save-recipe", args.force)
    lm = _open(args)
    saes = load_run_saes(args.run, device=lm.device)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
              seed=args.seed)
    base = generate(lm, args.prompt, None, saes, **kw)
    steered = generate(lm, args.prompt, recipe, saes, **kw)
    width = 58
    for p, b, s in zip(args.prompt, base, steered):
        print(f"\nprompt: {p!r}")
        left = textwrap.wrap(b.replace("\n", " / "), width) or [""]
        right = textwrap.wrap(s.replace("\n", " / "), width) or [""]
        print(f"{'baseline':<{width}} | steered")
        print("-" * width + "-+-" + "-" * width)
        for i in range(max(len(left), len(right))):
            print(f"{(left[i] if i < len(left) else ''):<{width}} | {right[i] if i < len(right) else ''}")
    if args.save_recipe:
        print(f"\nrecipe -> {recipe.save(args.save_recipe)}")


def cmd_app(args) -> None:
    from sc_steer_apps.playground import launch
    from sc_steer_apps.serving import Limits

    limits = Limits(args.max_new_tokens, args.max_prompt_tokens, args.time_limit).check()
    validate.integer("--port", args.port, 1, 65535)
    validate.text("--host", args.host)
    print(f"serving {', '.join(args.run)} on http://{args.host}:{args.port}/ (Ctrl+C to stop)", flush=True)
    launch(args.run, host=args.host, port=args.port, device=args.device, dtype=args.dtype, limits=limits)


def cmd_demo(args) -> None:
    import time

    from . import rundir
    from .evaluate import markdown_table
    from .pipeline import demo

    t = time.time()
    results = demo(args.out, collect_tokens=args.collect_tokens, train_tokens=args.train_tokens,
                   eval_tokens=args.eval_tokens, interpret_tokens=args.interpret_tokens, device=args.device,
                   dtype=args.dtype)
    print(markdown_table(results))
    print((Path(args.out) / rundir.INTERPRET_MD).read_text())
    print(f"demo finished in {time.time() - t:.0f} s. Results in {args.out}/: eval.md, eval.json, saes/<site>/, "
          "training_curves.png, interpret.md, browser/index.html, features/, neurons/, graph/, activations/. "
          f"Next: sc-steer app --run {args.out}")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``error:`` line (exit status 2), like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .graph.build import PRUNE, RANK_BY
    from .graph.measure import MODES as ABLATION_MODES, WHERE
    from .sae.train import PARALLEL_MODES
    from .steer import MODE_DOCS, POSITIONS

    ap = _Parser(prog="sc-steer", description="sparse autoencoders on LM activations: "
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
    p.add_argument("--shard-tokens", type=int, default=1 << 14, help="tokens per shard file (default: 16384)")
    p.add_argument("--store-dtype", help="float32, float16 or bfloat16 (default: the model's dtype)")
    p.add_argument("--packing", default="pad", choices=["pad", "pack"],
                   help="pad: one document per row group; pack: concatenate documents (default: pad)")
    p.add_argument("--no-bos", action="store_true", help="do not start rows with BOS")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train one SAE per site (from a collection, or streaming from the model)")
    p.add_argument("--activations", help="an activation collection folder (default: stream from --model)")
    _add_model_args(p)
    p.add_argument("--data", default="demo", help="text to stream activations from when no --activations")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--out", required=True, help="run folder: saes/<site>/, checkpoint, logs, curves")
    p.add_argument("--config", help="a .toml / .yaml / .json training config; flags below override it")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds another run")
    p.add_argument("--parallel", choices=PARALLEL_MODES, help="under torchrun: 'layers' gives each process its "
                   "share of the sites; 'data' splits every batch over the processes (needs --activations)")
    p.add_argument("--sites", help="e.g. resid_post.* or resid_post.1,resid_post.2")
    p.add_argument("--tokens", type=int, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--architecture", help="relu, topk, batchtopk or jumprelu")
    p.add_argument("--k", type=int)
    p.add_argument("--expansion", type=int)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--l1-coeff", type=float)
    p.add_argument("--l0-coeff", type=float)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="L0, FVU, dead/dense fractions, CE loss recovered and KL per site")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--data", default="demo:heldout")
    p.add_argument("--max-tokens", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("interpret", help="top tokens, contexts, logit lens and scores for SAE features and "
                       "neurons; a static HTML browser")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--data", default="demo:heldout")
    p.add_argument("--sites", help="only these SAE sites (default: all in the run)")
    p.add_argument("--max-tokens", type=int, default=200_000)
    p.add_argument("--top-n", type=int, default=100, help="top activations kept per unit (scored; 10 are shown)")
    p.add_argument("--window", type=int, default=8, help="tokens either side of a top activation")
    p.add_argument("--min-count", type=int, default=5, help="occurrences a token needs for the top-token table")
    p.add_argument("--no-neurons", action="store_true", help="skip the residual-dimension and MLP-neuron baseline")
    p.set_defaults(func=cmd_interpret)

    p = sub.add_parser("graph", help="ablate features at layer n, measure layer n+1 features, export a graph")
    p.add_argument("--run", required=True, help="a run folder with saes/ (labels come from its interpretation)")
    _add_model_args(p, default=None)
    p.add_argument("--prompts", default="demo:heldout", help="a .txt file (one prompt per line) or a data spec")
    p.add_argument("--max-prompts", type=int, default=64)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--out", required=True, help="output folder, e.g. graphs/my-graph")
    p.add_argument("--name", default="graph")
    p.add_argument("--layers", help="source layers N or N-M (default: all but the last)")
    p.add_argument("--sources", default="active", help="active, top:N, attr:N, or ids like 3,17,42")
    p.add_argument("--mode", default="zero", choices=ABLATION_MODES)
    p.add_argument("--value", type=float, help="the clamp value")
    p.add_argument("--where", default="all", choices=WHERE, help="ablate at all text positions or "
                   "only where the source fires")
    p.add_argument("--prune", default="top_k", choices=PRUNE)
    p.add_argument("--amount", type=float, default=5, help="k for top_k; a fraction for relative/cumulative")
    p.add_argument("--rank-by", default="weight", choices=RANK_BY)
    p.add_argument("--no-attribution", action="store_true")
    p.add_argument("--force", action="store_true", help="replace another graph in --out")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("steer", help="generate with SAE features added / removed; baseline and steered side by side")
    p.add_argument("--run", required=True, help="a run folder with saes/")
    _add_model_args(p, default=None)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    for mode, (value, what) in MODE_DOCS.items():
        p.add_argument(f"--{mode}", action="append", metavar="SITE:FEATURE" + (f":{value}" if value else ""), help=what)
    p.add_argument("--positions", default="all", choices=POSITIONS)
    p.add_argument("--include-bos", action="store_true",
                   help="also edit the BOS position (left alone by default: no SAE was trained on it)")
    p.add_argument("--recipe", help="a recipe JSON (interventions above are appended)")
    p.add_argument("--save-recipe", help="write the recipe used to this JSON file")
    p.add_argument("--force", action="store_true", help="let --save-recipe replace an existing file")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("app", help="the Gradio steering playground for one or more runs")
    p.add_argument("--run", action="append", required=True, help="a run folder (repeat to offer several)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=200, help="the most tokens one request may generate")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="the longest prompt one request may send")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds one generation may hold the model; "
                   "it stops there and returns what it has (default: 60)")
    _add_device_args(p)
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("demo", help="collect -> train -> eval -> interpret -> graph on the shipped demo model, offline")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--collect-tokens", type=int, default=1_200_000)
    p.add_argument("--train-tokens", type=int, help="training tokens per SAE (default 1,228,800)")
    p.add_argument("--eval-tokens", type=int, default=50_000)
    p.add_argument("--interpret-tokens", type=int, default=200_000)
    _add_device_args(p)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    from . import distributed

    args = build_parser().parse_args(argv)
    where = f"[rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}] " if distributed.launched() else ""
    try:
        args.func(args)
    except ScSteerError as e:
        print(f"{where}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}interrupted: progress was checkpointed; rerun the same command (train: add --resume) to "
              "continue", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
