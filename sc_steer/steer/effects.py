"""What a recipe does to the model's predictions along its own steered continuation: KL to the
unsteered run, target-token log-probabilities, watched features, perplexity and (given a concept) the
judge-free scores of ``scores.py``."""
from __future__ import annotations

import json

import torch

from ..devices import follow_model
from ..errors import ScSteerError
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .forced import teacher_forced
from .generate import generate_ids
from .recipe import Intervention, Recipe
from .scores import Concept, score_continuations


def _one(lm: LM, ids: torch.Tensor, n: int, items: list[Intervention], saes: dict[str, SAE],
         watch: list[tuple[str, int]]) -> tuple[torch.Tensor, dict]:
    """``teacher_forced`` on one unpadded sequence ``[1, T]``, with the watched features' activations."""
    read = {Site.parse(s, lm.n_layers) for s, _ in watch}
    logits, h = teacher_forced(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, n, items, saes,
                               sorted(read, key=lambda s: s.order))
    with torch.no_grad():
        seen = {(s, f): saes[s].encode(h[Site.parse(s, lm.n_layers)].float())[0, :, f] for s, f in watch}
    return logits[0], seen


def measure_effects(lm: LM, prompts: list[str], recipe: Recipe, saes: dict[str, SAE], *, max_new_tokens: int = 30,
                    target_tokens: list[str] = (), watch: list[tuple[str, int]] = (), concept=None) -> dict:
    """What a recipe does, per prompt, along its own (greedy) steered continuation:

    * ``kl_per_step``: KL(steered || baseline) of the next-token distribution at each generated step;
    * ``target_logprob_change``: mean change of each target token's log-probability over those steps;
    * ``watch``: mean activation of chosen (site, feature) pairs over the generated tokens: the steered
      model on its continuation vs the unsteered model on its own (baseline) continuation;
    * ``perplexity``: the unsteered model's perplexity of the steered continuation (a fluency proxy),
      next to that of the baseline continuation;
    * ``scores`` (with ``concept``: a ``(site, feature)`` or a ``scores.Concept``, e.g. a probe direction
      for a raw vector): the judge-free scores of ``scores.py`` for the steered continuation, and
      ``scores_baseline`` for the unsteered one.
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
    if concept is not None and not isinstance(concept, Concept):
        concept = Concept.of_feature(lm, saes, *concept)
    report = []
    for prompt in prompts:
        # the generated ids themselves: decoding and re-tokenising is not the identity for SentencePiece
        s_ids, n = generate_ids(lm, [prompt], recipe, saes, max_new_tokens=max_new_tokens)
        b_ids, _ = generate_ids(lm, [prompt], None, saes, max_new_tokens=max_new_tokens)
        row = {"prompt": prompt, "steered": tok.decode(s_ids[0, n:], skip_special_tokens=True),
               "baseline": tok.decode(b_ids[0, n:], skip_special_tokens=True)}
        # the unsteered model along each continuation: perplexity (fluency proxy) and, on its own
        # continuation, the baseline of the watched features
        base_s_logits, _ = _one(lm, s_ids, n, [], saes, [])
        base_b_logits, base_seen = _one(lm, b_ids, n, [], saes, watch)
        st_logits, st_seen = _one(lm, s_ids, n, recipe.interventions, saes, watch)
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
        if concept is not None:
            prompt_row = [s_ids[0, :n].tolist()]
            row["scores"] = score_continuations(lm, saes, concept, prompt_row, s_ids[:, n:],
                                                items=recipe.interventions)[0]
            row["scores_baseline"] = score_continuations(lm, saes, concept, prompt_row, b_ids[:, n:])[0]
        report.append(row)
    return {"recipe": json.loads(recipe.to_json()), "prompts": report}
