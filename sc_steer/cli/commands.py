"""What each ``sc-steer`` command does: open what it needs, call the library, print where results went."""
from __future__ import annotations

from pathlib import Path

from .. import validate
from ..errors import ScSteerError
from ..files import check_new_file


def _open(args):
    """The model named by --model, or else by the run's run.json, on --device in --dtype."""
    from ..models import open_model
    from ..rundir import read_run

    remote = {"ndif": True, "local": "local", None: False}[args.remote]
    model = args.model or read_run(args.run)["model"]
    return open_model(model, device=args.device, dtype=args.dtype, remote=remote)


def cmd_collect(args) -> None:
    from .. import distributed
    from ..activations import collect

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
    from ..sae.config import TrainConfig, config_from_dict, load_config

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
    from .. import distributed
    from ..pipeline import train_from_model, train_from_store
    from ..rundir import sae_sites

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
    from ..evaluate import markdown_table
    from ..pipeline import eval_run

    results = eval_run(args.run, args.data, lm=_open(args), max_tokens=args.max_tokens, batch_size=args.batch_size)
    print(markdown_table(results))
    print(f"-> {args.run}/eval.json, {args.run}/eval.md")


def cmd_interpret(args) -> None:
    from .. import rundir
    from ..pipeline import interpret_run

    sites = [x.strip() for x in args.sites.split(",")] if args.sites else None
    summary = interpret_run(args.run, args.data, lm=_open(args), max_tokens=args.max_tokens, sites=sites,
                            neurons=not args.no_neurons, top_n=args.top_n, window=args.window,
                            min_count=args.min_count)
    print((Path(args.run) / rundir.INTERPRET_MD).read_text())
    print(f"-> {args.run}/{rundir.FEATURES}/<site>.jsonl and .md, {args.run}/{rundir.NEURONS}/, "
          f"{args.run}/{rundir.BROWSER}/index.html, {args.run}/{rundir.SCORES_PNG} ({summary['n_tokens']:,} tokens)")


def cmd_probe(args) -> None:
    from .. import rundir
    from ..pipeline import probe_run

    probe_run(args.run, args.data, args.label, field=args.field, lm=_open(args), max_per_label=args.max_per_label,
              ctx=args.ctx, neurons=not args.no_neurons, seed=args.seed)
    print((Path(args.run) / rundir.PROBE_MD).read_text())
    print(f"-> {args.run}/{rundir.PROBE_JSON}, {args.run}/{rundir.PROBE_MD}")


def cmd_graph(args) -> None:
    from ..pipeline import graph_run

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
    curve = tuple(_numbers("--curve", args.curve)) if args.curve else ()
    for a in curve:
        validate.number("--curve amount", a, 0, lo_open=True)
    g, paths, corr = graph_run(args.run, args.prompts, args.out, lm=lm, layers=layers, sources=sources,
                               mode=args.mode, value=args.value, where=args.where, prune=args.prune,
                               amount=args.amount, rank_by=args.rank_by, attribute=not args.no_attribution,
                               ctx=args.ctx, max_prompts=args.max_prompts, name=args.name, force=args.force,
                               curve=curve, prompt=args.prompt, edge_amount=args.edge_amount, n_logits=args.logits,
                               logit_diff=args.logit_diff)
    print(f"graph: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges"
          + ("; attribution vs exact (Pearson): " + ", ".join(f"{k} {v:.3f}" for k, v in corr.items()) if corr else ""))
    print("-> " + ", ".join(str(p) for p in paths.values()))


def _parse_interventions(args):
    from ..steer import MODE_DOCS, Intervention, Recipe

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

    from ..rundir import load_run_saes
    from ..steer import MODE_DOCS, generate

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


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScSteerError(f"{flag} {text!r}: expected comma-separated numbers") from None


def cmd_steer_eval(args) -> None:
    from ..steer.run import STEER_EVAL_MD, parse_features, prompts_from, steer_eval_run

    validate.integer("--n-prompts", args.n_prompts, 1)
    validate.integer("--vector-tokens", args.vector_tokens, 1000)
    features = parse_features(args.run, args.features, args.recipe, args.seed)
    prompts = prompts_from(args.prompts, args.n_prompts)
    coeffs = _numbers("--coeffs", args.coeffs)
    seeds = [] if args.seeds.strip().lower() == "none" else _numbers("--seeds", args.seeds, int)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    out = Path(args.out or Path(args.run) / "steer_eval")
    result = steer_eval_run(args.run, features, prompts, out, lm=_open(args), methods=methods, coeffs=coeffs,
                            max_new_tokens=args.max_new_tokens, seeds=tuple(seeds), greedy=not args.no_greedy,
                            vector_data=args.vector_data, vector_tokens=args.vector_tokens,
                            min_fluency=args.min_fluency)
    text = (out / STEER_EVAL_MD).read_text()
    print(text.split("\n## ")[0])
    best = result["methods"][0]
    print(f"best at matched cost: {best['method']} (H {best['H']:.3f}) -> {out}/")


def cmd_steerability(args) -> None:
    from ..steer.run import prompts_from, steerability_run
    from ..steer.steerability import steerability_path

    validate.integer("--n-prompts", args.n_prompts, 1)
    validate.number("--scale", args.scale, 0, 100, lo_open=True)
    sites = [s.strip() for s in args.sites.split(",")] if args.sites else None
    res = steerability_run(args.run, lm=_open(args), sites=sites, prompts=prompts_from(args.prompts, args.n_prompts),
                           scale=args.scale)
    for s, r in res.items():
        top = sorted(range(len(r["scores"])), key=lambda i: -r["scores"][i])[:5]
        print(f"{s}: coefficient {r['coeff']:.2f}; highest output scores "
              + ", ".join(f"{i} ({r['scores'][i]:+.3f})" for i in top) + f" -> {steerability_path(args.run, s)}")


def cmd_import(args) -> None:
    from ..import_run import import_saes, parse_site_args
    from ..models import open_model

    if not args.model:
        raise ScSteerError("import: name the model the SAEs read (--model, a local folder or 'demo')")
    sites = parse_site_args(args.site)
    remote = {"ndif": True, "local": "local", None: False}[args.remote]
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    lm = open_model(model, device=args.device, dtype=args.dtype, remote=remote)
    done = import_saes(lm, args.out, args.paths, sites, model=model, force=args.force)
    for site, rec in done.items():
        print(f"{site:<14} <- {rec['path']} ({rec['format']} {rec['class']}, hook {rec.get('hook')})")
    print(f"{len(done)} SAEs converted and copied into {args.out}/saes/; next: sc-steer eval --run {args.out}")


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

    from ..demo.run import demo, summary

    t = time.perf_counter()
    record = demo(args.out, full=args.full, train_tokens=args.train_tokens, eval_tokens=args.eval_tokens,
                  interpret_tokens=args.interpret_tokens, device=args.device, dtype=args.dtype, force=args.force)
    print(summary(args.out, record, time.perf_counter() - t))
