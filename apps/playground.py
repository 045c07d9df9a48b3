"""The steering playground: a thin Gradio UI over ``sc_steer.steer`` for one run directory.

    sc-steer app --run runs/demo            # http://127.0.0.1:7860
    sc-steer app --run runs/demo --run runs/other   # several runs, chosen in the UI

No science here: search reads the run's interpretation files, generation calls ``sc_steer.steer``.
One model serves every user, so model calls go through one lock (and Gradio's queue); each browser
session keeps its own recipe in ``gr.State``. Only files under the run folder are read, and nothing
is unpickled.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from sc_steer.errors import ScSteerError  # noqa: E402
from sc_steer.models import open_model  # noqa: E402
from sc_steer.pipeline import load_run_saes, read_run  # noqa: E402
from sc_steer.steer import Intervention, Recipe, generate  # noqa: E402

COLUMNS = ["site", "feature", "mode", "coeff", "positions"]


class Playground:
    """State shared by all users: the model, the SAEs, the interpretation index, and the model lock."""

    def __init__(self, run: str | Path):
        self.run = Path(run).resolve()
        info = read_run(self.run)
        self.lm = open_model(info["model"])
        self.saes = load_run_saes(self.run)
        self.lock = threading.Lock()
        self.features: dict[str, list[dict]] = {}
        for site in self.saes:
            path = self._path("features", f"{site}.jsonl")
            if path.exists():
                self.features[site] = [json.loads(line) for line in path.read_text().splitlines()]
        graph = self._path("graph", "graph.json")
        self.graph = json.loads(graph.read_text()) if graph.exists() else None

    def _path(self, *parts: str) -> Path:
        p = self.run.joinpath(*parts).resolve()
        if self.run not in p.parents and p != self.run:
            raise ScSteerError(f"refusing to read {p}: outside the run folder")
        return p

    # -- search -----------------------------------------------------------------------------------
    def search(self, query: str, site: str) -> list[list]:
        q = (query or "").strip().lower()
        rows = []
        for rec in self.features.get(site, []):
            if not q or str(rec["id"]) == q or q in rec["label"].lower() or \
                    any(q == t["token"].strip().lower() for t in rec["top_tokens"]):
                rows.append([site, rec["id"], rec["label"], round(rec["density"], 5)])
            if len(rows) >= 50:
                break
        return rows

    def describe(self, site: str, feature: int) -> str:
        feats = self.features.get(site)
        if not feats or not 0 <= feature < len(feats):
            return f"{site} feature {feature}: no interpretation in this run"
        rec = feats[feature]
        lines = [f"### {site} #{feature}: {rec['label']}",
                 f"density {100 * rec['density']:.3f}%, max {rec['max_act']:.2f}", "", "**Top contexts**"]
        for c in rec["contexts"][:5]:
            toks = [f"⟦{t}⟧" if i == c["max_index"] else t for i, t in enumerate(c["tokens"])]
            lines.append("- `" + "".join(toks).replace("\n", " ").replace("`", "'") + f"` ({c['max']:.2f})")
        if self.graph:
            nid = f"L{site.split('.')[-1]}/F{feature}"
            edges = [e for e in self.graph["links"] if nid in (e["source"], e["target"])]
            if edges:
                lines += ["", "**Ablation-graph neighbourhood**"]
                lines += [f"- {e['source']} → {e['target']}: weight {e['weight']:.3g}" for e in edges[:12]]
        return "\n".join(lines)

    # -- model calls (serialised) ------------------------------------------------------------------
    def heatmap(self, prompt: str, site: str, feature: int) -> list[tuple[str, float]]:
        import nnsight

        from sc_steer.sites import Site

        if not prompt:
            return []
        with self.lock, torch.no_grad():
            ids = self.lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
            with self.lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) as tracer:
                h = nnsight.save(self.lm.site_value(Site.parse(site, self.lm.n_layers)))
                tracer.stop()
            acts = self.saes[site].encode(h[0].float())[:, feature]
        m = float(acts.max()) or 1.0
        return [(self.lm.tokenizer.decode([t]), round(float(a) / m, 3)) for t, a in zip(ids[0].tolist()[1:], acts[1:])]

    def steer(self, prompt: str, recipe: Recipe, max_new_tokens: int, sample: bool, temperature: float,
              seed: int) -> tuple[str, str]:
        return self.continuation(prompt, None, max_new_tokens, sample, temperature, seed), \
            self.continuation(prompt, recipe, max_new_tokens, sample, temperature, seed)

    def continuation(self, prompt: str, recipe: Recipe | None, max_new_tokens: int, sample: bool,
                     temperature: float, seed: int) -> str:
        text = ""
        for text in self.stream(prompt, recipe, max_new_tokens, sample, temperature, seed):
            pass
        return text

    def stream(self, prompt: str, recipe: Recipe | None, max_new_tokens: int, sample: bool, temperature: float,
               seed: int):
        """Yield the continuation as it grows, token by token (generation holds the model lock)."""
        from transformers import TextIteratorStreamer

        kw = dict(max_new_tokens=int(max_new_tokens), do_sample=bool(sample), temperature=float(temperature),
                  seed=int(seed))
        streamer = TextIteratorStreamer(self.lm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        result: dict = {}

        def work():
            try:
                with self.lock:
                    result["text"] = generate(self.lm, [prompt], recipe, self.saes, streamer=streamer, **kw)[0]
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        worker.join()
        if "error" in result:
            raise result["error"]
        yield result["text"]  # the exact decoded continuation (the streamer's pieces may differ in spacing)


def recipe_from_rows(rows) -> Recipe:
    items = []
    data = rows.values.tolist() if hasattr(rows, "values") else (rows or [])
    for r in data:
        if not r or r[0] in (None, ""):
            continue
        items.append(Intervention(str(r[0]), int(r[1]), str(r[2]), float(r[3]), str(r[4])))
    return Recipe(items)


def python_snippet(recipe: Recipe, run: Path) -> str:
    items = ",\n    ".join(f"Intervention({it.site!r}, {it.feature}, {it.mode!r}, {it.coeff}, {it.positions!r})"
                           for it in recipe.interventions)
    return ("from sc_steer.models import open_model\nfrom sc_steer.pipeline import load_run_saes, read_run\n"
            "from sc_steer.steer import Intervention, Recipe, generate\n\n"
            f"lm = open_model(read_run({str(run)!r})['model'])\nsaes = load_run_saes({str(run)!r})\n"
            f"recipe = Recipe([\n    {items}\n])\nprint(generate(lm, ['your prompt'], recipe, saes, max_new_tokens=40))\n")


def build(runs: str | Path | list) -> gr.Blocks:
    """The app over one or more run folders (each with its own model and SAEs; chosen in the UI)."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    pgs = {str(Path(r).resolve()): Playground(r) for r in runs}
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
                mode = gr.Radio(["add", "remove", "clamp", "scale"], value="add", label="mode")
                coeff = gr.Slider(-40, 40, value=10, step=0.5, label="coefficient", elem_id="coeff")
                positions = gr.Radio(["all", "prompt", "generated", "last"], value="all", label="positions")
                add_btn = gr.Button("Add to recipe", elem_id="add")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", value="Ge1:1 In the beginning", lines=2, elem_id="prompt")
                recipe_rows = gr.Dataframe(headers=COLUMNS, datatype=["str", "number", "str", "number", "str"],
                                           interactive=True, label="recipe", elem_id="recipe")
                with gr.Row():
                    max_new = gr.Slider(1, 200, value=40, step=1, label="max new tokens")
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
                for it in recipe.interventions:
                    it.check(pg.lm, pg.saes)
                exports = recipe.to_json(), python_snippet(recipe, pg.run)
                base = ""
                for base in pg.stream(text, None, n, smp, temp, sd):
                    yield base, "", [], *exports
                steered = ""
                for steered in pg.stream(text, recipe, n, smp, temp, sd):
                    yield base, steered, [], *exports
            except (ScSteerError, ValueError) as e:
                raise gr.Error(str(e)) from None
            heat_v = pg.heatmap(text, s, int(f)) if f is not None else []
            yield base, steered, heat_v, recipe.to_json(), python_snippet(recipe, pg.run)

        def api_steer(text: str, recipe: str, n: int = 40, smp: bool = False, temp: float = 1.0, sd: int = 0,
                      run: str = ""):
            try:
                return pgs[run or str(first.run)].steer(text, Recipe.from_json(recipe), n, smp, temp, sd)
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


def launch(runs: str | Path | list, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    demo = build(runs)
    demo.launch(server_name=host, server_port=port, show_api=True, **kwargs)
    return demo
