"""The steering playground: a thin Gradio UI over ``sc_steer.steer`` for one or more run directories.

    sc-steer app --run runs/demo            # http://127.0.0.1:7860
    sc-steer app --run runs/demo --run runs/other   # several runs, chosen in the UI
    sc-steer app --run runs/demo --device cuda --dtype bfloat16

No science here: search reads the run's interpretation files, generation calls ``sc_steer.steer``
(through ``serving.Playground``). One model serves every user, so model calls go through one lock
(and Gradio's queue); each browser session keeps its own recipe in the UI. Only files under the run
folder are read, and nothing is unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from sc_steer.errors import ScSteerError  # noqa: E402
from sc_steer.steer import MODES, POSITIONS, Intervention, Recipe  # noqa: E402

from .serving import Limits, Playground  # noqa: E402

COLUMNS = ["site", "feature", "mode", "coeff", "positions"]


def recipe_from_rows(rows) -> Recipe:
    items = []
    data = rows.values.tolist() if hasattr(rows, "values") else (rows or [])
    for r in data:
        if not r or r[0] in (None, ""):
            continue
        items.append(Intervention(str(r[0]), int(r[1]), str(r[2]), float(r[3]), str(r[4])))
    return Recipe(items)


def python_snippet(recipe: Recipe, pg: Playground) -> str:
    items = ",\n    ".join(f"Intervention({it.site!r}, {it.feature}, {it.mode!r}, {it.coeff}, {it.positions!r})"
                           for it in recipe.interventions)
    run, dtype = str(pg.run), str(pg.lm.dtype).removeprefix("torch.")
    return ("from sc_steer.rundir import load_run_saes, open_run_model\n"
            "from sc_steer.steer import Intervention, Recipe, generate\n\n"
            f"lm = open_run_model({run!r}, device={str(pg.lm.device)!r}, dtype={dtype!r})\n"
            f"saes = load_run_saes({run!r}, device=lm.device)\n"
            f"recipe = Recipe([\n    {items}\n])\nprint(generate(lm, ['your prompt'], recipe, saes, max_new_tokens=40))\n")


def build(runs: str | Path | list, *, device: str | torch.device = "cpu",
          dtype: str | torch.dtype = "float32", limits: Limits = Limits()) -> gr.Blocks:
    """The app over one or more run folders (each with its own model and SAEs; chosen in the UI), the
    models opened on ``device`` in ``dtype``."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    pgs = {str(Path(r).resolve()): Playground(r, device=device, dtype=dtype, limits=limits) for r in runs}
    first = next(iter(pgs.values()))
    sites = list(first.saes)
    with gr.Blocks(title="sc-steer playground") as demo:
        gr.Markdown("# sc-steer steering playground")
        with gr.Row():
            with gr.Column(scale=1):
                run_box = gr.Dropdown(list(pgs), value=str(first.run), label="run (model + SAEs)", elem_id="run")
                site = gr.Dropdown(sites, value=sites[0], label="site")
                query = gr.Textbox(label="search features (token, label or id)", elem_id="query")
                search_btn = gr.Button("Search", elem_id="search")
                results = gr.Dataframe(headers=["site", "feature", "label", "density"], interactive=False,
                                       elem_id="results")
                feature = gr.Number(label="feature id", precision=0, value=0, elem_id="feature")
                details = gr.Markdown()
                mode = gr.Radio(list(MODES), value="add", label="mode")
                coeff = gr.Slider(-40, 40, value=10, step=0.5, label="coefficient", elem_id="coeff")
                positions = gr.Radio(list(POSITIONS), value="all", label="positions")
                add_btn = gr.Button("Add to recipe", elem_id="add")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", value="Ge1:1 In the beginning", lines=2, elem_id="prompt")
                recipe_rows = gr.Dataframe(headers=COLUMNS, datatype=["str", "number", "str", "number", "str"],
                                           interactive=True, label="recipe", elem_id="recipe")
                with gr.Row():
                    max_new = gr.Slider(1, limits.max_new_tokens, value=min(40, limits.max_new_tokens), step=1,
                                        label="max new tokens")
                    sample = gr.Checkbox(label="sample", value=False)
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                    seed = gr.Number(label="seed", value=0, precision=0)
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    base_out = gr.Textbox(label="baseline", lines=8, elem_id="baseline")
                    steer_out = gr.Textbox(label="steered", lines=8, elem_id="steered")
                heat = gr.HighlightedText(label="feature activation on the prompt")
                with gr.Row():
                    recipe_json = gr.Code(label="recipe JSON", language="json")
                    snippet = gr.Code(label="Python", language="python")

        def do_run(r):
            ss = list(pgs[r].saes)
            return gr.update(choices=ss, value=ss[0]), [], []

        def do_search(r, q, s):
            return pgs[r].search(q, s)

        def do_select(r, evt: gr.SelectData, table):
            row = table.values.tolist()[evt.index[0]] if hasattr(table, "values") else table[evt.index[0]]
            return int(row[1]), pgs[r].describe(row[0], int(row[1]))

        def do_add(rows, s, f, m, c, p):
            data = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
            data = [r for r in data if r and r[0] not in (None, "")]
            data.append([s, int(f), m, float(c), p])
            return data

        def do_generate(r, text, rows, n, smp, temp, sd, s, f):
            """Streams token by token: the baseline first, then the steered text; then the heatmap."""
            pg = pgs[r]
            try:
                recipe = recipe_from_rows(rows)
                pg.check_request(text, recipe, n, smp, temp, sd)
                exports = recipe.to_json(), python_snippet(recipe, pg)
                base = ""
                for base in pg.stream(text, None, n, smp, temp, sd):
                    yield base, "", [], *exports
                steered = ""
                for steered in pg.stream(text, recipe, n, smp, temp, sd):
                    yield base, steered, [], *exports
                heat_v = pg.heatmap(text, s, f) if f is not None else []
            except (ScSteerError, ValueError) as e:
                raise gr.Error(str(e)) from None
            yield base, steered, heat_v, recipe.to_json(), python_snippet(recipe, pg)

        def api_steer(text: str, recipe: str, n: int = 40, smp: bool = False, temp: float = 1.0, sd: int = 0,
                      run: str = ""):
            try:
                pg = pgs[run or str(first.run)]
                return pg.steer(text, pg.parse_recipe(recipe), n, smp, temp, sd)
            except KeyError:
                raise gr.Error(f"unknown run {run!r}; this app serves {', '.join(pgs)}") from None
            except ScSteerError as e:
                raise gr.Error(str(e)) from None

        run_box.change(do_run, [run_box], [site, results, recipe_rows])
        search_btn.click(do_search, [run_box, query, site], results)
        query.submit(do_search, [run_box, query, site], results)
        results.select(do_select, [run_box, results], [feature, details])
        feature.change(lambda r, s, f: pgs[r].describe(s, int(f or 0)), [run_box, site, feature], details)
        add_btn.click(do_add, [recipe_rows, site, feature, mode, coeff, positions], recipe_rows)
        gen_btn.click(do_generate, [run_box, prompt, recipe_rows, max_new, sample, temperature, seed, site, feature],
                      [base_out, steer_out, heat, recipe_json, snippet])
        api_in = [gr.Textbox(visible=False), gr.Textbox(visible=False), gr.Number(visible=False),
                  gr.Checkbox(visible=False), gr.Number(visible=False), gr.Number(visible=False),
                  gr.Textbox(visible=False)]
        api_out = [gr.Textbox(visible=False), gr.Textbox(visible=False)]
        api_btn = gr.Button(visible=False)
        api_btn.click(api_steer, api_in, api_out, api_name="steer")
    demo.queue(default_concurrency_limit=4)
    return demo


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
