"""Steering generation with SAE features (activation additions), applied at every generation step.

A recipe is a list of interventions, each at a site (``resid_post.{i}`` above all; ``attn_out``,
``mlp_out`` and ``mlp_act`` too, each edited where its SAE reads it):

* ``add``    -- ``h += coeff * W_dec[i]`` (unit decoder row), or ``coeff * vector`` for a raw vector;
* ``remove`` -- error-preserving ablation ``h -= f_i(h) W_dec[i]``, recomputed from the current h;
* ``clamp``  -- ``h += (coeff - f_i(h)) W_dec[i]`` (set the feature to ``coeff``);
* ``scale``  -- ``h += (coeff - 1) f_i(h) W_dec[i]``.

Positions: ``all`` (every position of every step), ``prompt`` (the prompt, at the prefill step),
``generated`` (the newly generated tokens, at the decoding steps), ``last`` (the newest position of
each step). The BOS position is left alone unless ``include_bos`` is set: its activations are far
outside what the SAEs were trained on (training, graphs and evaluation never use BOS), so encoding it
for remove/clamp/scale reads meaningless feature values, and editing it moves every later position
through attention. With the KV cache the prefill step sees ``[B, prompt_len, d]`` and later steps ``[B, 1, d]``;
the edit is a forward hook on the site's module (``LM.edited``), so it runs at every step of
``transformers``' own ``generate``: steering costs the edit and nothing else. A raw ``vector`` of shape
``[L, d]`` (an ActAdd difference) is added to the first ``L`` prompt positions.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import validate
from .devices import follow_model
from .errors import ScSteerError
from .files import atomic_write_text
from .models import LM
from .sae import SAE
from .sites import Site

MODES = ("add", "remove", "clamp", "scale")
MAX_COEFF = 1e4   # |coefficient| beyond this only overflows the residual stream
POSITIONS = ("all", "prompt", "generated", "last")


@dataclass
class Intervention:
    site: str
    feature: int | None = None
    mode: str = "add"
    coeff: float = 1.0
    positions: str = "all"
    vector: list | None = None      # raw direction [d] or ActAdd sequence [L, d] instead of a feature
    include_bos: bool = False       # also edit the BOS position (left alone by default)

    def check(self, lm: LM, saes: dict[str, SAE]) -> None:
        validate.text("intervention site", self.site)
        width = lm.width(Site.parse(self.site, lm.n_layers))
        validate.choice("intervention mode", self.mode, MODES)
        validate.choice("positions", self.positions, POSITIONS)
        validate.number(f"coefficient ({self.mode} at {self.site})", self.coeff, -MAX_COEFF, MAX_COEFF)
        validate.boolean("include_bos", self.include_bos)
        if (self.feature is None) == (self.vector is None):
            raise ScSteerError(f"intervention at {self.site}: give exactly one of feature= or vector=")
        if self.vector is not None:
            try:
                v = torch.as_tensor(self.vector, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ScSteerError(f"vector at {self.site}: expected a list of numbers (or a list of such lists)") from None
            if v.dim() not in (1, 2) or v.shape[-1] != width or not len(v):
                raise ScSteerError(f"vector at {self.site}: expected shape [{width}] or [L, {width}], "
                                   f"got {list(v.shape)}")
            if self.mode != "add":
                raise ScSteerError("a raw vector can only be added (mode='add')")
            if not torch.isfinite(v).all():
                raise ScSteerError(f"vector at {self.site}: holds NaN or infinite values")
            return
        if self.site not in saes:
            raise ScSteerError(f"no SAE for {self.site} (have: {', '.join(saes) or 'none'})")
        from .sae.metrics import check_sae_fits

        check_sae_fits(lm, Site.parse(self.site, lm.n_layers), saes[self.site])
        d_sae = saes[self.site].cfg.d_sae
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or not 0 <= self.feature < d_sae:
            raise ScSteerError(f"feature id {self.feature!r} is out of range for {self.site} (0-{d_sae - 1})")


@dataclass
class Recipe:
    interventions: list[Intervention] = field(default_factory=list)
    name: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            d = json.loads(text)
            known = set(Intervention.__dataclass_fields__)
            items = []
            for x in d.get("interventions", []):
                unknown = set(x) - known
                if unknown:
                    raise ScSteerError(f"recipe: unknown intervention key(s) {', '.join(sorted(unknown))}")
                items.append(Intervention(**x))
            return cls(items, d.get("name", ""))
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise ScSteerError(f"recipe is not valid JSON of the expected shape ({e})") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        if not Path(path).exists():
            raise ScSteerError(f"recipe file {str(path)!r} does not exist")
        return cls.from_json(Path(path).read_text())


def bos_positions(lm: LM, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` True where the token is the tokenizer's BOS (none for tokenizers without one)."""
    bos = lm.tokenizer.bos_token_id
    if bos is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return input_ids == bos


def step_mask(it: Intervention, shape: tuple[int, int], prefill: bool, prompt_mask: torch.Tensor | None,
              device, bos: torch.Tensor | None = None) -> torch.Tensor | None:
    """Where ``it`` applies at one generation step (None: not at this step); ``bos`` marks the prompt's
    BOS positions, excluded unless ``it.include_bos``."""
    if it.positions == "prompt" and not prefill or it.positions == "generated" and prefill:
        return None
    where = torch.ones(shape, dtype=torch.bool, device=device)
    if prefill and prompt_mask is not None:
        where &= prompt_mask.to(device).bool()
    if prefill and bos is not None and not it.include_bos:
        where &= ~bos.to(device)
    if it.positions == "last":
        where[:, :-1] = False
    return where


def edit_hidden(h: torch.Tensor, items: list[Intervention], saes: dict[str, SAE],
                masks: list[torch.Tensor | None], align_start: torch.Tensor | None = None) -> torch.Tensor:
    """Apply interventions to ``h [B, T, d]``, each where its mask ``[B, T]`` is True (None: skip it).

    An ActAdd sequence ``[L, d]`` is added at positions ``align_start[b] ...`` (the first real prompt
    token of each row) and only when given ``align_start``.
    """
    out = h.float()
    B, T, _ = h.shape
    for it, where in zip(items, masks):
        if where is None:
            continue
        if it.vector is not None:
            v = torch.as_tensor(it.vector, dtype=torch.float32, device=h.device)
            if v.dim() == 1:
                out = out + it.coeff * where[..., None] * v
            elif align_start is not None:
                for b in range(B):
                    s0 = int(align_start[b])
                    n = min(len(v), T - s0)
                    out[b, s0:s0 + n] += it.coeff * v[:n] * where[b, s0:s0 + n, None]
            continue
        sae = saes[it.site]
        w = sae.W_dec[it.feature].detach().to(h.device)
        if it.mode == "add":
            amount = torch.full((B, T), float(it.coeff), device=h.device)
        else:
            f = sae.encode(out)[..., it.feature]
            amount = {"remove": -f, "clamp": it.coeff - f, "scale": (it.coeff - 1) * f}[it.mode]
        out = out + (amount * where)[..., None] * w
    return out.to(h.dtype)


def _tokenize(lm: LM, prompts: list[str]) -> dict:
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"].to(lm.device), "attention_mask": enc["attention_mask"].to(lm.device)}


def generate(lm: LM, prompts: list[str], recipe: Recipe | None = None, saes: dict[str, SAE] | None = None, *,
             max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, streamer=None, max_time: float | None = None,
             cancel: threading.Event | None = None) -> list[str]:
    """Continuations of ``prompts`` (text after each prompt), steered by ``recipe`` at every step.

    ``streamer`` is passed to ``transformers`` generate (e.g. a ``TextIteratorStreamer``) to receive
    tokens as they are produced. Generation stops early (returning what it has) after ``max_time``
    seconds or once ``cancel`` is set: how a server bounds a request.
    """
    ids, n = generate_ids(lm, prompts, recipe, saes, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, streamer=streamer,
                          max_time=max_time, cancel=cancel)
    return [lm.tokenizer.decode(row[n:], skip_special_tokens=True) for row in ids]


def generate_ids(lm: LM, prompts: list[str], recipe: Recipe | None = None, saes: dict[str, SAE] | None = None,
                 *, max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, streamer=None, max_time: float | None = None,
                 cancel: threading.Event | None = None) -> tuple[torch.Tensor, int]:
    """``generate``'s token ids: ``[B, n + new]`` (left-padded prompts, then the continuation) and ``n``."""
    saes = follow_model(saes or {}, lm)
    items = list(recipe.interventions) if recipe else []
    for it in items:
        it.check(lm, saes)
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ScSteerError("generate: give a list of one or more non-empty prompts")
    for p in prompts:
        validate.text("prompt", p)
    validate.integer("max_new_tokens", max_new_tokens, 1)
    validate.integer("seed", seed, 0)
    validate.boolean("do_sample", do_sample)
    if do_sample:
        validate.number("temperature", temperature, 0, 100, lo_open=True)
        validate.integer("top_k", top_k, 0)
        validate.number("top_p", top_p, 0, 1, lo_open=True)
    inputs = _tokenize(lm, prompts)
    lm.check_positions(inputs["input_ids"].shape[1] + max_new_tokens, "prompt tokens + max_new_tokens")
    # raw vectors become tensors on the model's device once, not at every generation step
    items = [replace(it, vector=torch.as_tensor(it.vector, dtype=torch.float32).to(lm.device))
             if it.vector is not None else it for it in items]
    by_site: dict[Site, list[Intervention]] = {}
    for it in items:
        by_site.setdefault(Site.parse(it.site, lm.n_layers), []).append(it)
    gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                  "pad_token_id": lm.tokenizer.pad_token_id}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if streamer is not None:  # e.g. transformers' TextIteratorStreamer, for one prompt
        gen_kwargs["streamer"] = streamer
    if max_time is not None or cancel is not None:
        gen_kwargs["stopping_criteria"] = _stop_after(max_time, cancel)
    torch.manual_seed(seed)
    mask = inputs["attention_mask"]
    bos = bos_positions(lm, inputs["input_ids"])
    start = (1 - mask).sum(1)   # each row's first real prompt token (prompts are left-padded)

    def edit(site: Site, h: torch.Tensor, call: int) -> torch.Tensor | None:
        prefill = call == 0   # the KV cache's first step holds the whole prompt, later ones one token
        masks = [step_mask(it, h.shape[:2], prefill, mask, h.device, bos) for it in by_site[site]]
        if all(m is None for m in masks):
            return None
        return edit_hidden(h, by_site[site], saes, masks, start if prefill else None)

    with torch.no_grad(), lm.edited(edit, list(by_site)):
        ids = lm.hf.generate(**inputs, **gen_kwargs)
    return ids, inputs["input_ids"].shape[1]


def _stop_after(max_time: float | None, cancel: threading.Event | None):
    """A transformers stopping criterion: the time budget is spent, or ``cancel`` was set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    deadline = None if max_time is None else time.monotonic() + validate.number("max_time", max_time, 0, lo_open=True)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = (deadline is not None and time.monotonic() > deadline) or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stop()])


def actadd_vector(lm: LM, site: str, positive: str, negative: str) -> torch.Tensor:
    """ActAdd: activations of ``positive`` minus ``negative`` at ``site``, position by position ``[L, d]``
    (the shorter prompt is padded with space tokens, as in the original method)."""
    import nnsight

    tok = lm.tokenizer
    a, b = tok(positive)["input_ids"], tok(negative)["input_ids"]
    space = tok(" ", add_special_tokens=False)["input_ids"] or [tok.pad_token_id]
    n = max(len(a), len(b))
    a, b = a + space * (n - len(a)), b + space * (n - len(b))
    ids = torch.tensor([a, b], device=lm.device)
    s = Site.parse(site, lm.n_layers)
    with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) as tracer:
        h = nnsight.save(lm.site_value(s))
        tracer.stop()
    return (h[0] - h[1]).float().cpu()


def decompose(vector: torch.Tensor, sae: SAE, k: int = 10) -> dict:
    """Which SAE features make up a steering vector: by cosine with decoder rows and by encoder projection,
    the most positively aligned (``by_cosine``, ``by_encoder``: features the vector adds) and the most
    negatively aligned (``against_by_cosine``, ``against_by_encoder``: features it suppresses, e.g. the
    negative prompt's side of an ActAdd difference)."""
    W = sae.W_dec.detach().float()
    v = torch.as_tensor(vector).to(W.device, torch.float32)
    if v.dim() == 2:
        v = v.sum(0)
    cos = (W @ v) / (W.norm(dim=1) * v.norm()).clamp_min(1e-12)
    proj = v @ sae.W_enc.detach().float()

    def ranked(x: torch.Tensor, sign: int) -> list:
        top = (sign * x).topk(min(k, len(x)))
        return [[int(i), float(sign * c)] for c, i in zip(top.values, top.indices)]

    return {"by_cosine": ranked(cos, 1), "by_encoder": ranked(proj, 1),
            "against_by_cosine": ranked(cos, -1), "against_by_encoder": ranked(proj, -1)}


def _teacher_forced(lm: LM, ids: torch.Tensor, n_prompt: int, items: list[Intervention], saes: dict[str, SAE],
                    watch: list[tuple[str, int]]) -> tuple[torch.Tensor, dict]:
    """Logits of one sequence ``[1, T]`` with the recipe applied where generation would have applied it,
    and the activations of the watched (site, feature) pairs (after any edit at that site)."""
    T = ids.shape[1]
    by_site: dict[Site, list[Intervention]] = {}
    for it in items:
        by_site.setdefault(Site.parse(it.site, lm.n_layers), []).append(it)
    watched = {Site.parse(s, lm.n_layers) for s, _ in watch}
    sites = sorted(set(by_site) | watched, key=lambda s: s.order)
    pos = torch.arange(T, device=ids.device)[None]
    region = {"all": pos >= 0, "prompt": pos < n_prompt, "generated": pos >= n_prompt, "last": pos >= n_prompt - 1}
    not_bos = ~(bos_positions(lm, ids) & (pos < n_prompt))

    def where(it: Intervention) -> torch.Tensor:
        return region[it.positions] if it.include_bos else region[it.positions] & not_bos

    seen: dict = {}

    def edit(site: Site, h: torch.Tensor, _call: int) -> torch.Tensor | None:
        new = None
        if site in by_site:
            its = by_site[site]
            new = edit_hidden(h, its, saes, [where(it) for it in its], torch.zeros(1, dtype=torch.long))
        for s, f in watch:
            if Site.parse(s, lm.n_layers) == site:
                seen[(s, f)] = saes[s].encode((h if new is None else new).float())[0, :, f]
        return new

    with torch.no_grad(), lm.edited(edit, sites):
        logits = lm.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[0].float(), seen


def measure_effects(lm: LM, prompts: list[str], recipe: Recipe, saes: dict[str, SAE], *, max_new_tokens: int = 30,
                    target_tokens: list[str] = (), watch: list[tuple[str, int]] = ()) -> dict:
    """What a recipe does, per prompt, along its own (greedy) steered continuation:

    * ``kl_per_step``: KL(steered || baseline) of the next-token distribution at each generated step;
    * ``target_logprob_change``: mean change of each target token's log-probability over those steps;
    * ``watch``: mean activation of chosen (site, feature) pairs over the generated tokens: the steered
      model on its continuation vs the unsteered model on its own (baseline) continuation;
    * ``perplexity``: the unsteered model's perplexity of the steered continuation (a fluency proxy),
      next to that of the baseline continuation.
    """
    follow_model(saes, lm)
    for it in recipe.interventions:
        it.check(lm, saes)
    for s, f in watch:
        if s not in saes or not 0 <= f < saes[s].cfg.d_sae:
            raise ScSteerError(f"watch ({s}, {f}): no such SAE feature")
    tok = lm.tokenizer
    target_ids = {}
    for t in target_tokens:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ScSteerError(f"target token {t!r} is {len(ids)} tokens; give single tokens")
        target_ids[t] = ids[0]
    report = []
    for prompt in prompts:
        # the generated ids themselves: decoding and re-tokenising is not the identity for SentencePiece
        s_ids, n = generate_ids(lm, [prompt], recipe, saes, max_new_tokens=max_new_tokens)
        b_ids, _ = generate_ids(lm, [prompt], None, saes, max_new_tokens=max_new_tokens)
        row = {"prompt": prompt, "steered": tok.decode(s_ids[0, n:], skip_special_tokens=True),
               "baseline": tok.decode(b_ids[0, n:], skip_special_tokens=True)}
        # the unsteered model along each continuation: perplexity (fluency proxy) and, on its own
        # continuation, the baseline of the watched features
        base_s_logits, _ = _teacher_forced(lm, s_ids, n, [], saes, [])
        base_b_logits, base_seen = _teacher_forced(lm, b_ids, n, [], saes, watch)
        st_logits, st_seen = _teacher_forced(lm, s_ids, n, recipe.interventions, saes, watch)
        for name, ids, logits in (("steered", s_ids, base_s_logits), ("baseline", b_ids, base_b_logits)):
            lp = torch.log_softmax(logits[n - 1:-1], -1)
            tgt = ids[0, n:]
            row[f"perplexity_{name}"] = float((-lp.gather(-1, tgt[:, None])).mean().exp()) if len(tgt) else float("nan")
        lp = torch.log_softmax(base_s_logits[n - 1:-1], -1)
        lq = torch.log_softmax(st_logits[n - 1:-1], -1)
        row["kl_per_step"] = [float(x) for x in (lq.exp() * (lq - lp)).sum(-1)]
        row["target_logprob_change"] = {t: float((lq[:, i] - lp[:, i]).mean()) for t, i in target_ids.items()}
        row["watch"] = {f"{s}:{f}": {"steered": float(st_seen[(s, f)][n:].mean()) if s_ids.shape[1] > n else 0.0,
                                     "baseline": float(base_seen[(s, f)][n:].mean()) if b_ids.shape[1] > n else 0.0}
                        for s, f in watch}
        report.append(row)
    return {"recipe": json.loads(recipe.to_json()), "prompts": report}
