"""What a recipe does to the model's predictions along its own steered continuation: KL to the
unsteered run, target-token log-probabilities, watched features and perplexity."""
from __future__ import annotations

import json

import torch

from ..devices import follow_model
from ..errors import ScSteerError
from ..models import LM
from ..sae import SAE
from ..sites import Site
from .generate import bos_positions, edit_hidden, generate_ids
from .recipe import Intervention, Recipe


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as ``generate`` numbers them: from 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def teacher_forced(lm: LM, inputs: dict, n_prompt: int, items: list[Intervention], saes: dict[str, SAE],
                   read: list[Site] = ()) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    """One forward pass over whole sequences ``[B, T]`` (left-padded prompts of ``n_prompt`` columns, then
    their continuations) with the interventions applied where generation applied them, step by step:
    ``prompt`` below column ``n_prompt``, ``generated`` from it on, ``last`` from ``n_prompt - 1`` on,
    the BOS left alone unless asked, an ActAdd sequence from each row's first real token.

    Returns the logits ``[B, T, vocab]`` (fp32) and the hidden state at each ``read`` site, after any edit
    there."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    T = ids.shape[1]
    by_site: dict[Site, list[Intervention]] = {}
    for it in items:
        by_site.setdefault(Site.parse(it.site, lm.n_layers), []).append(it)
    sites = sorted(set(by_site) | set(read), key=lambda s: s.order)
    pos = torch.arange(T, device=ids.device)[None].expand_as(ids)
    real = mask.bool()
    region = {"all": real, "prompt": real & (pos < n_prompt), "generated": real & (pos >= n_prompt),
              "last": real & (pos >= n_prompt - 1)}
    not_bos = ~(bos_positions(lm, ids) & (pos < n_prompt))
    start = (1 - mask).sum(1)

    def where(it: Intervention) -> torch.Tensor:
        return region[it.positions] if it.include_bos else region[it.positions] & not_bos

    seen: dict[Site, torch.Tensor] = {}

    def edit(site: Site, h: torch.Tensor, _call: int) -> torch.Tensor | None:
        new = None
        if site in by_site:
            its = by_site[site]
            new = edit_hidden(h, its, saes, [where(it) for it in its], start)
        if site in read:
            seen[site] = h if new is None else new
        return new

    with torch.no_grad(), lm.edited(edit, sites):
        logits = lm.hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logits.float(), seen


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
        report.append(row)
    return {"recipe": json.loads(recipe.to_json()), "prompts": report}
