"""What the playground serves, without any UI: per run folder, the model, its SAEs, the interpretation
index and the graph, and one lock that serialises model calls.

Kept apart from the Gradio code so that it can be used (and tested, e.g. on a GPU machine without
Gradio) on its own. No science here either: generation is ``sc_steer.steer.generate``.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sc_steer import rundir, validate
from sc_steer.errors import ScSteerError
from sc_steer.files import read_json
from sc_steer.graph.build import node_id
from sc_steer.sites import Site
from sc_steer.steer import Recipe, generate


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the shared model (set at launch: `sc-steer app --max-new-tokens ...`)."""

    max_new_tokens: int = 200
    max_prompt_tokens: int = 1024
    seconds: float = 60.0           # per generation; it stops there and returns what it has
    max_recipe_chars: int = 200_000

    def check(self) -> Limits:
        validate.integer("--max-new-tokens", self.max_new_tokens, 1)
        validate.integer("--max-prompt-tokens", self.max_prompt_tokens, 1)
        validate.number("--time-limit", self.seconds, 0, lo_open=True)
        return self


class FairLock:
    """The model lock, handed over in arrival order (``threading.Lock`` promises no order, so a busy
    user could take it again and again while another waits): everyone waits at most for the
    generations queued before theirs, each bounded by the request limits."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._held = False

    def __enter__(self):
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: not self._held and self._queue[0] is ticket)
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held


def as_int(name: str, value) -> int:
    """Gradio hands numbers over as floats: 40.0 is 40, 40.5 is an error."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return validate.integer(name, value)


class Playground:
    """State shared by all users of one run: model, SAEs (on the model's device), index, and the lock."""

    def __init__(self, run: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 limits: Limits = Limits()):
        self.run = Path(run).resolve()
        self.limits = limits.check()
        self.lm = rundir.open_run_model(self.run, device=device, dtype=dtype)
        self.saes = rundir.load_run_saes(self.run, device=self.lm.device)
        self.lock = FairLock()
        self.features: dict[str, list[dict]] = {}
        for site in self.saes:
            records = rundir.read_records(self._path(), site)
            if records is not None:
                self.features[site] = records
        graph = self._path(rundir.GRAPH, "graph.json")
        self.graph = read_json(graph, "the run's feature graph (node-link JSON)") if graph.exists() else None
        if self.graph is not None and not isinstance(self.graph.get("links"), list):
            raise ScSteerError(f"{str(graph)!r} is not a node-link graph (no list of \"links\"); rerun sc-steer graph")

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
            nid = node_id(Site.parse(site).layer, feature)
            edges = [e for e in self.graph["links"] if nid in (e["source"], e["target"])]
            if edges:
                lines += ["", "**Ablation-graph neighbourhood**"]
                lines += [f"- {e['source']} → {e['target']}: weight {e['weight']:.3g}" for e in edges[:12]]
        return "\n".join(lines)

    # -- model calls (serialised) ------------------------------------------------------------------
    def heatmap(self, prompt: str, site: str, feature: int) -> list[tuple[str, float]]:
        import nnsight

        if not prompt:
            return []
        if site not in self.saes:
            raise ScSteerError(f"site {site!r}: this run has SAEs for {', '.join(self.saes)}")
        feature = validate.integer("feature id", as_int("feature id", feature), 0, self.saes[site].cfg.d_sae - 1)
        self.check_request(prompt, None, 1, False, 1.0, 0)
        with self.lock, torch.no_grad():
            ids = self.lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.lm.device)
            with self.lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) as tracer:
                h = nnsight.save(self.lm.site_value(Site.parse(site, self.lm.n_layers)))
                tracer.stop()
            acts = self.saes[site].encode(h[0]).cpu()[:, feature]
        m = float(acts.max()) or 1.0
        return [(self.lm.tokenizer.decode([t]), round(float(a) / m, 3)) for t, a in zip(ids[0].tolist()[1:], acts[1:])]

    def check_request(self, prompt, recipe: Recipe | None, max_new_tokens, sample, temperature, seed) -> dict:
        """Every field of a generation request, checked against its type and this server's limits,
        before the model lock is taken. Returns the generation keywords."""
        lim = self.limits
        validate.text("prompt", prompt, max_chars=8 * lim.max_prompt_tokens)
        n_prompt = len(self.lm.tokenizer(prompt)["input_ids"])
        if n_prompt > lim.max_prompt_tokens:
            raise ScSteerError(f"prompt: {n_prompt:,} tokens, more than this server's limit of "
                               f"{lim.max_prompt_tokens:,}")
        n = validate.integer("max_new_tokens", as_int("max_new_tokens", max_new_tokens), 1, lim.max_new_tokens)
        kw = dict(max_new_tokens=n, do_sample=validate.boolean("sample", sample),
                  temperature=validate.number("temperature", temperature, 0, 100, lo_open=True),
                  seed=validate.seed("seed", as_int("seed", seed)))
        for it in (recipe.interventions if recipe else []):
            it.check(self.lm, self.saes)
        self.lm.check_positions(n_prompt + n, "prompt tokens + max_new_tokens")
        return kw

    def parse_recipe(self, text: str) -> Recipe:
        validate.text("recipe", text, max_chars=self.limits.max_recipe_chars)
        return Recipe.from_json(text)

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
        """Yield the continuation as it grows, token by token (generation holds the model lock).

        The request is checked against the limits first; generation stops at the time limit, and as
        soon as the consumer stops listening (a client that went away), so the lock is soon free again.
        """
        from transformers import TextIteratorStreamer

        kw = self.check_request(prompt, recipe, max_new_tokens, sample, temperature, seed)
        streamer = TextIteratorStreamer(self.lm.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.limits.seconds + 300)
        cancel = threading.Event()
        result: dict = {}

        def work():
            try:
                with self.lock:
                    if cancel.is_set():
                        return
                    result["text"] = generate(self.lm, [prompt], recipe, self.saes, streamer=streamer,
                                              max_time=self.limits.seconds, cancel=cancel, **kw)[0]
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = e
            finally:
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            text = ""
            for piece in streamer:
                text += piece
                yield text
            worker.join()
        finally:  # also when the consumer closes this generator early: stop the generation
            cancel.set()
        if "error" in result:
            raise result["error"]
        if "text" in result:
            yield result["text"]  # the exact decoded continuation (the streamer's pieces may differ in spacing)
