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
from sc_steer.steer import Recipe, generate_ids


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


ALL_SITES = "all sites"


def fit_limits(limits: Limits, max_positions: int | None) -> Limits:
    """Request limits no larger than the model allows: a prompt and a continuation must fit its positions."""
    if max_positions is None:
        return limits
    from dataclasses import replace

    return replace(limits, max_prompt_tokens=min(limits.max_prompt_tokens, max_positions - 1),
                   max_new_tokens=min(limits.max_new_tokens, max_positions - 1))


def _match(rec: dict, q: str) -> float | None:
    """How a record matches a query (lower is better; None: no match)."""
    if not q:
        return 3.0
    if q == str(rec["id"]):
        return 0.0
    for i, t in enumerate(rec["top_tokens"]):
        if t["token"].strip().lower() == q:
            return 1.0 + i / 100
    if q in rec["label"].lower():
        return 2.0
    if any(q in "".join(c["tokens"]).lower() for c in rec["contexts"]):
        return 2.5
    return None


def _parse_node(nid: str) -> tuple[int, int]:
    layer, _, feature = nid.partition("/")
    return int(layer.lstrip("L")), int(feature.lstrip("F"))


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _md(text: str) -> str:
    """Token text for Markdown code spans: line breaks shown as ↵, backticks and pipes defused."""
    return text.replace("\n", "↵").replace("`", "'").replace("|", "¦")


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
        self.lm = rundir.open_run_model(self.run, device=device, dtype=dtype)
        self.limits = fit_limits(limits.check(), self.lm.max_positions)
        self.saes = rundir.load_run_saes(self.run, device=self.lm.device)
        self.lock = FairLock()
        self.features: dict[str, list[dict]] = {}
        for site in self.saes:
            records = rundir.read_records(self._path(), site)
            if records is not None:
                self.features[site] = records
        from sc_steer.steer.steerability import read_steerability

        self.steerability = {s: st["scores"] for s in self.saes
                             if (st := read_steerability(self.run, s)) is not None and st.get("features") is None}
        graph = self._path(rundir.GRAPH, "graph.json")
        self.graph = read_json(graph, "the run's feature graph (node-link JSON)") if graph.exists() else None
        if self.graph is not None and not isinstance(self.graph.get("links"), list):
            raise ScSteerError(f"{str(graph)!r} is not a node-link graph (no list of \"links\"); rerun sc-steer graph")

    def _path(self, *parts: str) -> Path:
        p = self.run.joinpath(*parts).resolve()
        if self.run not in p.parents and p != self.run:
            raise ScSteerError(f"refusing to read {p}: outside the run folder")
        return p

    # -- search ---------------------------------------------------------------------------------
    def search(self, query: str, site: str | None = None, sort: str = "match", limit: int = 100) -> list[list]:
        """Features of one site (or of every site: ``site`` None or "all") matching ``query``, ranked: an
        id or an exact top token first (by the token's place in the feature's list), then the label,
        then the top contexts' text; ``sort`` = density, score or steerability reorders the matches."""
        q = (query or "").strip().lower()
        sites = [s for s in self.saes if s in self.features] if site in (None, "", ALL_SITES) else [site]
        found = []
        for s in sites:
            for rec in self.features.get(s, []):
                rank = _match(rec, q)
                if rank is not None:
                    found.append((rank, s, rec))
        keys = {"match": lambda t: (t[0], -t[2]["density"]), "density": lambda t: -t[2]["density"],
                "score": lambda t: -(t[2].get("explain_score") or 0.0),
                "steerability": lambda t: -self._steer(t[1], t[2]["id"])}
        found.sort(key=keys.get(sort, keys["match"]))
        return [[s, rec["id"], round(rec["density"], 5), _round(rec.get("explain_score")),
                 _round(self._steer(s, rec["id"]) if s in self.steerability else None), rec["label"]]
                for _, s, rec in found[:limit]]

    def _steer(self, site: str, feature: int) -> float:
        return self.steerability.get(site, [0.0] * (feature + 1))[feature]

    def check_feature(self, site: str, feature) -> tuple[str, int]:
        """A (site, feature id) this run has, or one line saying what is wrong."""
        if site not in self.saes:
            raise ScSteerError(f"site {site!r}: this run has SAEs for {', '.join(self.saes)}")
        if isinstance(feature, float) and not feature.is_integer():
            raise ScSteerError(f"feature id {feature}: expected a whole number")
        d_sae = self.saes[site].cfg.d_sae
        f = validate.integer("feature id", as_int("feature id", feature))
        if not 0 <= f < d_sae:
            raise ScSteerError(f"feature id {f} is out of range for {site} (0-{d_sae - 1})")
        return site, f

    def record(self, site: str, feature: int) -> dict | None:
        feats = self.features.get(site)
        return feats[feature] if feats and 0 <= feature < len(feats) else None

    def describe(self, site: str, feature: int) -> str:
        """The feature's dashboard: label, density, scores, top tokens, contexts (line breaks kept, as
        ↵), logit lens, and its ablation-graph neighbours with their labels."""
        rec = self.record(site, feature)
        if rec is None:
            return f"### {site} #{feature}\nno interpretation of {site} in this run (run sc-steer interpret)"
        st = f", steerability {self._steer(site, feature):+.3f}" if site in self.steerability else ""
        lines = [f"### {site} #{feature}: {rec['label']}",
                 (f"density {100 * rec['density']:.3f}%, max activation {rec['max_act']:.2f}, explanation score "
                  f"{_fmt(rec.get('explain_score'))}{st}"), "",
                 "| top token | mean activation | count |", "|---|---|---|"]
        lines += [f"| `{_md(t['token'])}` | {t['mean']:.2f} | {t['count']} |" for t in rec["top_tokens"][:8]]
        lines += ["", "**Top contexts** (⟦peak⟧, activation)"]
        for c in rec["contexts"][:6]:
            toks = [f"⟦{t}⟧" if i == c["max_index"] else t for i, t in enumerate(c["tokens"])]
            lines.append("- `" + _md("".join(toks)) + f"` ({c['max']:.2f})")
        if rec.get("hist"):
            bars = "▁▂▃▄▅▆▇█"
            top = max(rec["hist"]) or 1
            lines += ["", "**Activation histogram** (log scale, left to right): `" +
                      "".join(bars[min(7, int(8 * c / top))] if c else " " for c in rec["hist"]) + "`"]
        lens = rec.get("logit_lens") or {}
        if lens:
            lines += ["", "**Logit lens**: promotes " + ", ".join(f"`{_md(t)}`" for t, _ in lens["promoted"][:8]) +
                      "; suppresses " + ", ".join(f"`{_md(t)}`" for t, _ in lens["suppressed"][:8])]
        lines += ["", *self.neighbours(site, feature)]
        return "\n".join(lines)

    def neighbours(self, site: str, feature: int) -> list[str]:
        """A line saying whether the feature is in the run's graph (its edges: ``neighbour_rows``)."""
        if not self.graph:
            return ["*This run has no feature graph (sc-steer graph).*"]
        s = Site.parse(site)
        if s.kind != "resid_post":
            return [f"*{site} is not in this run's graph (it holds residual-stream features).*"]
        rows = self.neighbour_rows(site, feature)
        if not rows:
            return [f"*{site} #{feature} is not in this run's graph (its {len(self.graph.get('nodes', []))} nodes "
                    "are the features the graph ablated or measured).*"]
        return [f"**Ablation-graph neighbours**: {len(rows)} edges, in the table below (click one to inspect it)"]

    def neighbour_rows(self, site: str, feature: int) -> list[list]:
        """``[site, feature, label, weight, "source of" / "target of"]`` per graph edge of the feature."""
        if not self.graph or Site.parse(site).kind != "resid_post":
            return []
        nid = node_id(Site.parse(site).layer, feature)
        out = []
        for e in sorted((e for e in self.graph["links"] if nid in (e["source"], e["target"])),
                        key=lambda e: -abs(e["weight"]))[:20]:
            other, role = (e["target"], "it feeds") if e["source"] == nid else (e["source"], "feeds it")
            layer, f = _parse_node(other)
            rec = self.record(f"resid_post.{layer}", f)
            out.append([f"resid_post.{layer}", f, rec["label"] if rec else "?", round(e["weight"], 4), role])
        return out

    def _node(self, nid: str) -> str:
        layer, feature = _parse_node(nid)
        site = f"resid_post.{layer}"
        rec = self.record(site, feature)
        return f"`{site}:{feature}` ({_md(rec['label']) if rec else '?'})"

    # -- model calls (serialised) ------------------------------------------------------------------
    def heatmap(self, prompt: str, site: str, feature: int) -> list[tuple[str, float]]:
        import nnsight

        if not prompt:
            return []
        site, feature = self.check_feature(site, feature)
        self.check_request(prompt, None, 1, False, 1.0, 0)
        with self.lock, torch.no_grad():
            ids = self.lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.lm.device)
            with self.lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) as tracer:
                h = nnsight.save(self.lm.site_value(Site.parse(site, self.lm.n_layers)))
                tracer.stop()
            acts = self.saes[site].encode(h[0]).cpu()[:, feature]
        m = float(acts.max()) or 1.0
        return [(self.lm.tokenizer.decode([t]), round(float(a) / m, 3)) for t, a in zip(ids[0].tolist()[1:], acts[1:])]

    def read_back(self, ids: torch.Tensor, n: int, features: list[tuple[str, int]]) -> dict:
        """Each feature's activation at every token of ``ids [1, T]`` (prompt of ``n`` tokens, then a
        continuation), read by the unsteered model: ``{(site, feature): [T] list}``; BOS reads 0."""
        from sc_steer.steer.forced import teacher_forced

        sites = sorted({Site.parse(s, self.lm.n_layers) for s, _ in features}, key=lambda s: s.order)
        ids = ids.to(self.lm.device)
        with self.lock, torch.no_grad():
            _, h = teacher_forced(self.lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, n, [],
                                  self.saes, sites)
            out = {}
            for s, f in features:
                acts = self.saes[s].encode(h[Site.parse(s, self.lm.n_layers)].float())[0, :, f].cpu()
                if self.lm.tokenizer.bos_token_id is not None and int(ids[0, 0]) == self.lm.tokenizer.bos_token_id:
                    acts[0] = 0.0
                out[(s, f)] = acts.tolist()
        return out

    def scores(self, prompt_ids: torch.Tensor, cont: torch.Tensor, recipe: Recipe,
               features: list[tuple[str, int]]) -> dict:
        """The judge-free steering scores (``sc_steer.steer.scores``) of one continuation: fluency and KL,
        and each feature's concept score."""
        from sc_steer.steer.scores import Concept, score_concepts

        concepts = [Concept.of_feature(self.lm, self.saes, s, f) for s, f in features]
        with self.lock, torch.no_grad():
            per_concept = score_concepts(self.lm, self.saes, concepts, [prompt_ids.tolist()], cont[None],
                                         items=recipe.interventions if recipe else [])
        out = {"fluency": {k: per_concept[0][0][k] for k in ("logprob", "rep2", "rep3", "kl", "n_tokens")}}
        out.update({f"{s}:{f}": sc[0]["concept"] for (s, f), sc in zip(features, per_concept)})
        return out

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
               seed: int, out: dict | None = None):
        """Yield the continuation as it grows, token by token (generation holds the model lock).

        The request is checked against the limits first; generation stops at the time limit, and as
        soon as the consumer stops listening (a client that went away), so the lock is soon free again.
        ``out`` receives the token ids (``ids [1, n + new]`` and ``n``) for reading the text back.
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
                    ids, n = generate_ids(self.lm, [prompt], recipe, self.saes, streamer=streamer,
                                          max_time=self.limits.seconds, cancel=cancel, **kw)
                    result["text"] = self.lm.tokenizer.decode(ids[0, n:], skip_special_tokens=True)
                    if out is not None:
                        out.update(ids=ids.cpu(), n=n)
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
