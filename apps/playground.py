"""The steering playground: a thin Gradio UI over ``sc_steer.steer`` for one or more run directories.

    sc-steer app --run runs/demo            # http://127.0.0.1:7860
    sc-steer app --run runs/demo --run runs/other   # several runs, chosen in the UI
    sc-steer app --run runs/demo --device cuda --dtype bfloat16

No science here: search reads the run's interpretation files, generation and scores call
``sc_steer.steer`` (through ``serving.Playground``). One model serves every user, so model calls go
through one lock (and Gradio's queue). Each browser session keeps its own recipe: one list of
interventions (``gr.State``) that the table, the JSON, the download and the snippet are all drawn
from, and that only the row controls, the JSON loader and the presets change. Only files under the
run folder are read, and nothing is unpickled.
"""
from __future__ import annotations

import html
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import torch

from sc_steer import validate
from sc_steer.errors import ScSteerError
from sc_steer.steer import MAX_COEFF, MODE_DOCS, MODES, POSITIONS, Intervention, Recipe

from .serving import ALL_SITES, Limits, Playground

COLUMNS = ["site", "feature", "mode", "coeff", "positions", "label"]
PRESETS = {"README example: stage directions (resid_post.1:1350, add 12)":
           [{"site": "resid_post.1", "feature": 1350, "mode": "add", "coeff": 12.0, "positions": "all"}]}
MODE_HELP = "; ".join(f"{m}: {what}" for m, (_, what) in MODE_DOCS.items())


def refuse(message: str) -> None:
    """A user mistake: one line in the server log, a warning in the browser, nothing run."""
    print(f"[playground] refused: {message}", file=sys.stderr, flush=True)
    gr.Warning(message)


def recipe_of(items: list[dict]) -> Recipe:
    return Recipe([Intervention(it["site"], it["feature"], it["mode"], it["coeff"], it["positions"]) for it in items])


def recipe_name(items: list[dict]) -> str:
    """A file name for the recipe, from what it does (``resid_post.1-1350-add12``)."""
    parts = [f"{it['site']}-{it['feature']}-{it['mode']}" + ("" if it["mode"] == "remove" else f"{it['coeff']:g}")
             for it in items]
    return "+".join(parts)[:120] or "empty"


def python_snippet(recipe: Recipe, pg: Playground, prompt: str, n: int, sample: bool, temperature: float,
                   seed: int) -> str:
    """Code that reproduces the run just made: the same prompt, length, sampling and seed."""
    items = ",\n    ".join(f"Intervention({it.site!r}, {it.feature}, {it.mode!r}, {it.coeff}, {it.positions!r})"
                           for it in recipe.interventions)
    run, dtype = str(pg.run), str(pg.lm.dtype).removeprefix("torch.")
    sampling = f", do_sample=True, temperature={temperature}, seed={seed}" if sample else f", seed={seed}"
    return ("from sc_steer.rundir import load_run_saes, open_run_model\n"
            "from sc_steer.steer import Intervention, Recipe, generate\n\n"
            f"lm = open_run_model({run!r}, device={str(pg.lm.device)!r}, dtype={dtype!r})\n"
            f"saes = load_run_saes({run!r}, device=lm.device)\n"
            f"recipe = Recipe([\n    {items}\n])\n"
            f"prompt = {prompt!r}\n"
            f"print(generate(lm, [prompt], None, saes, max_new_tokens={n}{sampling})[0])    # baseline\n"
            f"print(generate(lm, [prompt], recipe, saes, max_new_tokens={n}{sampling})[0])  # steered\n")


def heat_html(pg: Playground, rows: list[tuple[str, list[int], list[float]]], site: str, feature: int) -> str:
    """One feature's activation on each token of the prompt and both continuations, coloured against
    the feature's maximum on the interpretation data (absolute, comparable across texts), values on hover."""
    rec = pg.record(site, feature)
    top = max([rec["max_act"] if rec else 0.0] + [max(a, default=0.0) for _, _, a in rows]) or 1.0
    tok = pg.lm.tokenizer
    label = html.escape(rec["label"]) if rec else "no interpretation"
    scale = "its maximum on the interpretation data" if rec and top == rec["max_act"] else "the largest here"
    out = [(f"<div class='heat' data-feature='{site}:{feature}'><b>{site} #{feature}</b> {label} "
            f"<span class='legend'>0 <span style='display:inline-block;width:120px;height:10px;background:"
            f"linear-gradient(to right, rgba(255,140,0,0), rgba(255,140,0,1))'></span> {top:.2f} ({scale})</span>")]
    for name, ids, acts in rows:
        spans = []
        for t, a in zip(ids, acts):
            text = html.escape(tok.decode([t])).replace("\n", "↵<br>")
            spans.append(f"<span title='{a:.3f} ({100 * a / top:.0f}% of {top:.2f})' style='background:"
                         f"rgba(255,140,0,{min(1.0, max(0.0, a / top)):.3f})'>{text}</span>")
        out.append(f"<div><i>{name}</i>: {''.join(spans)}</div>")
    return "".join(out) + "</div>"


def scores_md(base: dict, steered: dict, features: list[str]) -> str:
    if not steered:
        return ""
    rows = ["| | concept " + " | concept ".join(features) + " | log-prob / token | repeated 3-grams | KL to baseline |",
            "|---" * (len(features) + 4) + "|"]
    for name, sc in (("baseline", base), ("steered", steered)):
        fl = sc["fluency"]
        rows.append(f"| {name} | " + " | ".join(f"{sc[f]:.3f}" for f in features) +
                    f" | {fl['logprob']:.3f} | {fl['rep3']:.2f} | {fl['kl']:.4f} |")
    return ("**Steering scores** (read by the unsteered model; `sc-steer steer-eval` explains them)\n\n"
            + "\n".join(rows))


def build(runs: str | Path | list, *, device: str | torch.device = "cpu",
          dtype: str | torch.dtype = "float32", limits: Limits = Limits()) -> gr.Blocks:
    """The app over one or more run folders (each with its own model and SAEs; chosen in the UI), the
    models opened on ``device`` in ``dtype``."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    pgs = {str(Path(r).resolve()): Playground(r, device=device, dtype=dtype, limits=limits) for r in runs}
    first = next(iter(pgs.values()))
    sites = list(first.saes)
    downloads = Path(tempfile.mkdtemp(prefix="sc-steer-recipes-"))

    def presets(r: str) -> list[str]:
        """The presets this run can play (a preset names features of the demo's SAEs)."""
        ok = []
        for name, items in PRESETS.items():
            try:
                for it in recipe_of(items).interventions:
                    it.check(pgs[r].lm, pgs[r].saes)
                ok.append(name)
            except ScSteerError:
                continue
        return ok

    def render(r: str, items: list[dict]):
        """Everything drawn from the recipe: the table, its JSON, and the download file named after it."""
        pg = pgs[r]
        table = [[it["site"], it["feature"], it["mode"], it["coeff"], it["positions"],
                  (pg.record(it["site"], it["feature"]) or {}).get("label", "")] for it in items]
        text = recipe_of(items).to_json() if items else ""
        path = downloads / f"recipe-{recipe_name(items)}.json"
        path.write_text(text or '{"interventions": []}')
        return table, text, str(path)

    with gr.Blocks(title="sc-steer playground") as demo:
        items_state = gr.State([])
        current = gr.State(None)        # [site, feature] being inspected
        editing = gr.State(None)        # index of the recipe row the controls edit
        gr.Markdown("# sc-steer steering playground")
        with gr.Row():
            with gr.Column(scale=1):
                run_box = gr.Dropdown(list(pgs), value=str(first.run), label="run (model + SAEs)", elem_id="run")
                with gr.Row():
                    scope = gr.Dropdown([ALL_SITES, *sites], value=ALL_SITES, label="search in", elem_id="scope")
                    sort = gr.Dropdown(["match", "density", "score", "steerability"], value="match",
                                       label="sort by", elem_id="sort")
                query = gr.Textbox(label="search features (token, label, context text or id)", elem_id="query")
                search_btn = gr.Button("Search", elem_id="search")
                results = gr.Dataframe(headers=["site", "feature", "density", "score", "steerability", "label"],
                                       interactive=False, elem_id="results", max_height=300)
                with gr.Row():
                    site = gr.Dropdown(sites, value=sites[0], label="site", elem_id="site")
                    feature = gr.Number(label="feature id", value=None, elem_id="feature")
                    inspect_btn = gr.Button("Inspect", elem_id="inspect")
                details = gr.Markdown(elem_id="details")
                neighbours = gr.Dataframe(headers=["site", "feature", "label", "weight", "edge"], interactive=False,
                                          label="graph neighbours (click to inspect)", elem_id="neighbours",
                                          max_height=240)
                mode = gr.Radio(list(MODES), value="add", label="mode", info=MODE_HELP, elem_id="mode")
                coeff = gr.Number(value=10.0, label=f"coefficient (|c| <= {MAX_COEFF:g}; add: try 0.5-2x the feature's "
                                  "max activation)", elem_id="coeff")
                positions = gr.Radio(list(POSITIONS), value="all", label="positions", elem_id="positions")
                with gr.Row():
                    add_btn = gr.Button("Add to recipe", elem_id="add", variant="secondary")
                    delete_btn = gr.Button("Delete selected row", elem_id="delete")
                    clear_btn = gr.Button("Clear recipe", elem_id="clear")
                editing_note = gr.Markdown("", elem_id="editing")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", value="Ge1:1 In the beginning", lines=2, elem_id="prompt")
                with gr.Row():
                    preset = gr.Dropdown(presets(str(first.run)), value=None, label="presets", elem_id="preset")
                    download = gr.DownloadButton("Download recipe", value=render(str(first.run), [])[2],
                                                 elem_id="download")
                recipe_table = gr.Dataframe(headers=COLUMNS, interactive=False, label="recipe (click a row to edit "
                                            "it with the controls on the left)", elem_id="recipe")
                recipe_json = gr.Textbox(label="recipe JSON (edit or paste, then Load)", lines=4, elem_id="recipe_json")
                load_btn = gr.Button("Load JSON", elem_id="load")
                with gr.Row():
                    max_new = gr.Slider(1, first.limits.max_new_tokens, value=min(40, first.limits.max_new_tokens),
                                        step=1, label="max new tokens", elem_id="max_new")
                    sample = gr.Checkbox(label="sample", value=False, elem_id="sample")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    base_out = gr.Textbox(label="baseline", lines=8, elem_id="baseline")
                    steer_out = gr.Textbox(label="steered", lines=8, elem_id="steered")
                scores = gr.Markdown(elem_id="scores")
                heat = gr.HTML(elem_id="heat")
                snippet = gr.Code(label="Python (reproduces the last run)", language="python", elem_id="snippet")

        drawn = [recipe_table, recipe_json, download]

        def do_run(r):
            ss = list(pgs[r].saes)
            return (gr.update(choices=[ALL_SITES, *ss], value=ALL_SITES), gr.update(choices=ss, value=ss[0]), [],
                    [], None, None, gr.update(choices=presets(r), value=None), *render(r, []))

        def do_search(r, q, sc, so):
            return pgs[r].search(q, sc, so)

        def show(r, s, f):
            try:
                s, f = pgs[r].check_feature(s, f)
            except ScSteerError as e:
                refuse(str(e))
                return None, f"**{e}**", []
            return [s, f], pgs[r].describe(s, f), pgs[r].neighbour_rows(s, f)

        def do_select(r, evt: gr.SelectData, table):
            """A clicked row (search results, graph neighbours) is inspected at its own site."""
            row = table.values.tolist()[evt.index[0]] if hasattr(table, "values") else table[evt.index[0]]
            cur, text, near = show(r, str(row[0]), row[1])
            return cur, text, near, gr.update(value=row[0]), row[1]

        def item_from(r, cur, m, c, p) -> dict | None:
            if cur is None:
                refuse("inspect a feature first (search and click a result, or type an id and press Inspect)")
                return None
            try:
                c = validate.number("coefficient", c, -MAX_COEFF, MAX_COEFF)
                it = Intervention(cur[0], int(cur[1]), m, c, p)
                it.check(pgs[r].lm, pgs[r].saes)
            except ScSteerError as e:
                refuse(str(e))
                return None
            return {"site": it.site, "feature": it.feature, "mode": it.mode, "coeff": it.coeff, "positions": it.positions}

        def do_add(r, items, cur, m, c, p):
            it = item_from(r, cur, m, c, p)
            items = list(items) + ([it] if it else [])
            return items, (len(items) - 1 if it else None), _note(items, len(items) - 1 if it else None), \
                *render(r, items)

        def do_pick_row(r, items, evt: gr.SelectData):
            i = evt.index[0]
            it = items[i]
            return (i, [it["site"], it["feature"]], pgs[r].describe(it["site"], it["feature"]),
                    pgs[r].neighbour_rows(it["site"], it["feature"]), gr.update(value=it["site"]), it["feature"],
                    it["mode"], it["coeff"], it["positions"], _note(items, i))

        def do_edit(r, items, i, cur, m, c, p):
            """The controls edit the selected row in place (one source of truth: the recipe)."""
            if i is None or i >= len(items):
                return gr.update(), gr.update(), *[gr.update()] * 3
            it = item_from(r, [items[i]["site"], items[i]["feature"]], m, c, p)
            if it is None:
                return gr.update(), gr.update(), *[gr.update()] * 3
            items = [*items[:i], it, *items[i + 1:]]
            return items, _note(items, i), *render(r, items)

        def do_delete(r, items, i):
            if i is None or i >= len(items):
                refuse("select a recipe row to delete (click it in the recipe table)")
                return items, None, "", *render(r, items)
            items = [*items[:i], *items[i + 1:]]
            return items, None, "", *render(r, items)

        def do_load(r, text):
            try:
                rec = pgs[r].parse_recipe(text)
                for it in rec.interventions:
                    if it.vector is not None:
                        raise ScSteerError("the playground edits feature interventions; run raw vectors with "
                                           "sc-steer steer --recipe")
                    it.check(pgs[r].lm, pgs[r].saes)
            except ScSteerError as e:
                refuse(str(e))
                return gr.update(), None, "", *[gr.update()] * 3
            items = [{"site": it.site, "feature": it.feature, "mode": it.mode, "coeff": float(it.coeff),
                      "positions": it.positions} for it in rec.interventions]
            return items, None, "", *render(r, items)

        def do_preset(r, name):
            if not name:
                return gr.update(), None, "", *[gr.update()] * 3
            return do_load(r, json.dumps({"interventions": PRESETS[name]}))

        def do_generate(r, text, items, n, smp, temp, sd, cur):
            """Streams token by token: the baseline first, then the steered text; then scores and heatmaps."""
            pg = pgs[r]
            keep = (gr.update(),) * 5
            if not items:
                refuse("the recipe is empty: nothing would be steered. Add a feature (Add to recipe), load a "
                       "recipe or choose a preset first")
                yield keep
                return
            recipe = recipe_of(items)
            try:
                pg.check_request(text, recipe, n, smp, temp, sd)
            except ScSteerError as e:
                refuse(str(e))
                yield keep
                return
            snip = python_snippet(recipe, pg, text, int(n), bool(smp), float(temp), int(sd))
            got_b, got_s = {}, {}
            base = steered = ""
            for base in pg.stream(text, None, n, smp, temp, sd, out=got_b):
                yield base, "", "", "", snip
            for steered in pg.stream(text, recipe, n, smp, temp, sd, out=got_s):
                yield base, steered, "", "", snip
            feats = list(dict.fromkeys([(it["site"], it["feature"]) for it in items] +
                                       ([tuple(cur)] if cur else [])))
            names = [f"{s}:{f}" for s, f in feats]
            n_prompt = got_s["n"]
            sc_b = pg.scores(got_b["ids"][0, :n_prompt], got_b["ids"][0, n_prompt:], None, feats)
            sc_s = pg.scores(got_s["ids"][0, :n_prompt], got_s["ids"][0, n_prompt:], recipe, feats)
            acts_b, acts_s = pg.read_back(got_b["ids"], n_prompt, feats), pg.read_back(got_s["ids"], n_prompt, feats)
            ids_b, ids_s = got_b["ids"][0].tolist(), got_s["ids"][0].tolist()
            maps = [heat_html(pg, [("prompt", ids_s[1:n_prompt], acts_s[k][1:n_prompt]),
                                   ("baseline", ids_b[n_prompt:], acts_b[k][n_prompt:]),
                                   ("steered", ids_s[n_prompt:], acts_s[k][n_prompt:])], *k) for k in feats]
            yield base, steered, scores_md(sc_b, sc_s, names), "".join(maps), snip

        def api_steer(text: str, recipe: str, n: int = 40, smp: bool = False, temp: float = 1.0, sd: int = 0,
                      run: str = ""):
            try:
                pg = pgs[run or str(first.run)]
                return pg.steer(text, pg.parse_recipe(recipe), n, smp, temp, sd)
            except KeyError:
                raise gr.Error(f"unknown run {run!r}; this app serves {', '.join(pgs)}") from None
            except ScSteerError as e:
                print(f"[playground] refused: {e}", file=sys.stderr, flush=True)
                raise gr.Error(str(e)) from None

        run_box.change(do_run, [run_box], [scope, site, results, items_state, editing, current, preset, *drawn])
        scope.change(list, None, results)       # results of another scope are not this one's
        search_btn.click(do_search, [run_box, query, scope, sort], results)
        query.submit(do_search, [run_box, query, scope, sort], results)
        sort.change(do_search, [run_box, query, scope, sort], results)
        results.select(do_select, [run_box, results], [current, details, neighbours, site, feature])
        neighbours.select(do_select, [run_box, neighbours], [current, details, neighbours, site, feature])
        inspect_btn.click(show, [run_box, site, feature], [current, details, neighbours])
        feature.submit(show, [run_box, site, feature], [current, details, neighbours])
        add_btn.click(do_add, [run_box, items_state, current, mode, coeff, positions],
                      [items_state, editing, editing_note, *drawn])
        recipe_table.select(do_pick_row, [run_box, items_state],
                            [editing, current, details, neighbours, site, feature, mode, coeff, positions, editing_note])
        for ctl in (mode, coeff, positions):
            ctl.change(do_edit, [run_box, items_state, editing, current, mode, coeff, positions],
                       [items_state, editing_note, *drawn])
        delete_btn.click(do_delete, [run_box, items_state, editing], [items_state, editing, editing_note, *drawn])
        clear_btn.click(lambda r: ([], None, "", *render(r, [])), [run_box], [items_state, editing, editing_note, *drawn])
        load_btn.click(do_load, [run_box, recipe_json], [items_state, editing, editing_note, *drawn])
        preset.change(do_preset, [run_box, preset], [items_state, editing, editing_note, *drawn])
        gen_btn.click(do_generate, [run_box, prompt, items_state, max_new, sample, temperature, seed, current],
                      [base_out, steer_out, scores, heat, snippet])
        api_in = [gr.Textbox(visible=False), gr.Textbox(visible=False), gr.Number(visible=False),
                  gr.Checkbox(visible=False), gr.Number(visible=False), gr.Number(visible=False),
                  gr.Textbox(visible=False)]
        api_out = [gr.Textbox(visible=False), gr.Textbox(visible=False)]
        api_btn = gr.Button(visible=False)
        api_btn.click(api_steer, api_in, api_out, api_name="steer")
    demo.queue(default_concurrency_limit=4)
    return demo


def _note(items: list[dict], i: int | None) -> str:
    if i is None or i >= len(items):
        return ""
    it = items[i]
    return (f"Editing row {i + 1}: {it['site']} #{it['feature']} — mode, coefficient and positions now change "
            "this row (click another row, or Add to recipe for a new one)")


def launch(runs: str | Path | list, host: str = "127.0.0.1", port: int = 7860, *, device: str | torch.device = "cpu",
           dtype: str | torch.dtype = "float32", limits: Limits = Limits(), **kwargs):
    """Build the app and serve it (blocks unless ``prevent_thread_lock=True`` is passed)."""
    check_address(host, port)   # before the models load: a taken port is known at once
    demo = build(runs, device=device, dtype=dtype, limits=limits)
    try:
        demo.launch(server_name=host, server_port=port, **kwargs)
    except (OSError, OverflowError) as e:
        raise ScSteerError(f"cannot serve on --host {host} --port {port}: {str(e).split('. ')[0]}") from None
    return demo


def check_address(host: str, port: int) -> None:
    """One line where ``port`` is taken on ``host``, or ``host`` is not an address of this machine."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds: a closing port is free
            s.bind((host, port))
    except (OSError, OverflowError) as e:
        raise ScSteerError(f"cannot serve on --host {host} --port {port}: {e.strerror or e} (is the port taken? "
                           "is the host an address of this machine?)") from None
