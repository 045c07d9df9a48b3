"""Judge-free scores of steered continuations, each read by the unsteered model so that the edit
cannot inflate it:

* ``concept``       -- the concept's mean activation over the continuation's tokens: the steered
  feature read by the site's SAE (or a named direction's projection), in an unsteered pass over
  prompt + continuation;
* ``concept_lens``  -- the mean log of the probability the unsteered model gives the concept's
  logit-lens tokens after each continuation token (does the text now lead it to expect them?);
* ``logprob``       -- fluency: the unsteered model's mean log-probability per continuation token;
* ``rep2``, ``rep3`` -- fluency: the share of the continuation's 2-grams (3-grams) that repeat an
  earlier one;
* ``kl``            -- side effect: the mean over generated steps of KL(steered || unsteered) between the
  next-token distributions of the steered pass (prefix, edits and all) and the unsteered one.

A continuation ends at its first EOS (included); what ``generate`` pads after it is not scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import follow_model
from ..errors import ScSteerError
from ..interpret.lens import lens_topk
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .forced import teacher_forced
from .generate import left_pad
from .recipe import Intervention

LENS_K = 10   # logit-lens tokens that stand for a concept
SCORES = ("concept", "concept_lens", "logprob", "rep2", "rep3", "kl")


@dataclass
class Concept:
    """What a continuation should be about: a feature of a site's SAE, or a direction at the site (a probe,
    a raw steering vector's own direction), with the tokens its logit lens promotes."""

    site: str
    feature: int | None = None
    direction: torch.Tensor | None = None
    lens_ids: torch.Tensor | None = None

    @classmethod
    def of_feature(cls, lm: LM, saes: dict[str, SAE], site: str, feature: int, k: int = LENS_K) -> Concept:
        if site not in saes:
            raise ScSteerError(f"concept {site}:{feature}: no SAE for {site} (have: {', '.join(saes) or 'none'})")
        sae = saes[site]
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < sae.cfg.d_sae:
            raise ScSteerError(f"concept feature {feature!r} is out of range for {site} (0-{sae.cfg.d_sae - 1})")
        return cls(site, feature, None, _lens(lm, site, sae.W_dec[feature], k))

    @classmethod
    def of_direction(cls, lm: LM, site: str, direction, k: int = LENS_K) -> Concept:
        d = torch.as_tensor(direction, dtype=torch.float32)
        s = Site.parse(site, lm.n_layers)
        if d.shape != (lm.width(s),) or not torch.isfinite(d).all() or float(d.norm()) == 0:
            raise ScSteerError(f"concept direction at {site}: expected {lm.width(s)} finite numbers, not all zero")
        return cls(site, None, d / d.norm(), _lens(lm, site, d, k))

    def read(self, h: torch.Tensor, saes: dict[str, SAE]) -> torch.Tensor:
        """``[B, T]``: the concept at every position of the site's hidden state ``h [B, T, d]``."""
        if self.feature is not None:
            return saes[self.site].encode(h.float())[..., self.feature]
        return h.float() @ self.direction.to(h.device)

    @property
    def name(self) -> str:
        return f"{self.site}:{self.feature}" if self.feature is not None else f"{self.site}:direction"


def _lens(lm: LM, site: str, direction: torch.Tensor, k: int) -> torch.Tensor | None:
    """The tokens a residual-stream direction promotes most (None where the site is not in the residual
    basis: an ``mlp_act`` direction has no logit lens of its own)."""
    if Site.parse(site, lm.n_layers).kind == "mlp_act":
        return None
    return lens_topk(lm, direction.detach().float()[None], k)[0][0]


def repeated_share(tokens: list[int], n: int) -> float:
    """The share of ``tokens``' n-grams that already occurred earlier in them (0 with no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def continuation_mask(cont: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``[B, N]`` True on each continuation's tokens up to and including its first EOS."""
    if eos_id is None:
        return torch.ones_like(cont, dtype=torch.bool)
    is_eos = (cont == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def score_continuations(lm: LM, saes: dict[str, SAE], concept: Concept, prompt_rows: list[list[int]],
                        cont: torch.Tensor, *, steered_rows: list[list[int]] | None = None,
                        items: list[Intervention] = ()) -> list[dict]:
    """The scores of each row's continuation ``cont [B, N]`` (generated after ``steered_rows``, by default
    the prompts themselves, with ``items`` applied), read after the bare ``prompt_rows``.

    ``steered_rows`` differ from ``prompt_rows`` where a method put text before the prompt (prompting):
    the steered pass sees that text, the unsteered reading does not."""
    return score_concepts(lm, saes, [concept], prompt_rows, cont, steered_rows=steered_rows, items=items)[0]


def score_concepts(lm: LM, saes: dict[str, SAE], concepts: list[Concept], prompt_rows: list[list[int]],
                   cont: torch.Tensor, *, steered_rows: list[list[int]] | None = None,
                   items: list[Intervention] = ()) -> list[list[dict]]:
    """``score_continuations`` for several concepts at once (one list of rows per concept): the
    unsteered and the steered pass run once, whatever the number of concepts."""
    follow_model(saes, lm)
    cont = cont.to(lm.device)
    B, N = cont.shape
    keep = continuation_mask(cont, lm.tokenizer.eos_token_id)
    sites = sorted({Site.parse(c.site, lm.n_layers) for c in concepts}, key=lambda s: s.order)

    def run(rows, its, read):
        prompts = left_pad(lm, rows)
        n = prompts["input_ids"].shape[1]
        inputs = {"input_ids": torch.cat([prompts["input_ids"], cont], 1),
                  "attention_mask": torch.cat([prompts["attention_mask"], torch.ones_like(cont)], 1)}
        logits, h = teacher_forced(lm, inputs, n, list(its), saes, read)
        return logits[:, n - 1:], h   # [B, N + 1, V]: before each token, and after the last

    with torch.no_grad():
        logits_u, h_u = run(prompt_rows, [], sites)
        lp_u = torch.log_softmax(logits_u, -1)
        token_lp = lp_u[:, :-1].gather(-1, cont[..., None])[..., 0]               # [B, N]
        if steered_rows is None and not items:
            kl = torch.zeros_like(token_lp)
        else:
            logits_s, _ = run(prompt_rows if steered_rows is None else steered_rows, items, [])
            lp_s = torch.log_softmax(logits_s[:, :-1], -1)
            kl = (lp_s.exp() * (lp_s - lp_u[:, :-1])).sum(-1)
        shared = []
        for b in range(B):
            k = keep[b]
            toks = cont[b][k].tolist()
            shared.append({"logprob": float(token_lp[b][k].mean()), "rep2": repeated_share(toks, 2),
                           "rep3": repeated_share(toks, 3), "kl": float(kl[b][k].mean()), "n_tokens": len(toks)})
        out = []
        for concept in concepts:
            h = h_u[Site.parse(concept.site, lm.n_layers)]
            c = concept.read(h[:, -N:], saes)                                      # [B, N]
            lens = (torch.logsumexp(lp_u[:, 1:, concept.lens_ids.to(lp_u.device)], -1)
                    if concept.lens_ids is not None else torch.full_like(token_lp, float("nan")))
            out.append([{"concept": float(c[b][keep[b]].mean()), "concept_lens": float(lens[b][keep[b]].mean()),
                         **shared[b]} for b in range(B)])
    return out
