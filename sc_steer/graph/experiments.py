"""Scripted ablation experiments: ablate any features (any layers, any mode) on some prompts and report
what happens downstream -- to chosen SAE features and to next-token predictions.

    from sc_steer.graph.experiments import Ablation, ablation_experiment
    report = ablation_experiment(lm, saes, ["In the beginning God"], [Ablation(1, 17)], targets=[(2, 5)])

Runs through nnsight: one clean forward and one edited forward per prompt batch (all ablations at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import iter_batches, iter_rows, pad_token_id
from ..devices import follow_model
from ..edits import add_along, edit_amount
from ..errors import ScSteerError
from ..models import LM, rewrap, unwrap
from ..sae import SAE
from ..sites import Site
from .build import node_id
from .measure import MODES, WHERE


@dataclass(frozen=True)
class Ablation:
    layer: int
    feature: int
    mode: str = "zero"          # zero | mean (needs value = the mean) | clamp
    value: float | None = None
    where: str = "all"          # all text positions, or only where the feature fires


def _check(lm: LM, saes: dict[str, SAE], ablations: list[Ablation], targets: list[tuple[int, int]]) -> None:
    if not ablations:
        raise ScSteerError("ablation_experiment: give at least one Ablation")
    for a in ablations + [Ablation(layer, f) for layer, f in targets]:
        name = f"resid_post.{a.layer}"
        if name not in saes:
            raise ScSteerError(f"no SAE for {name} (have: {', '.join(saes)})")
        if not 0 <= a.feature < saes[name].cfg.d_sae:
            raise ScSteerError(f"unknown feature id {a.feature} at layer {a.layer}: 0-{saes[name].cfg.d_sae - 1}")
    for a in ablations:
        if a.mode not in MODES or a.where not in WHERE:
            raise ScSteerError(f"{a}: mode must be one of {MODES}, where one of {WHERE}")
        if a.mode in ("mean", "clamp") and a.value is None:
            raise ScSteerError(f"{a}: mode {a.mode!r} needs value=")


def ablation_experiment(lm: LM, saes: dict[str, SAE], prompts: list[str], ablations: list[Ablation],
                        targets: list[tuple[int, int]] = (), *, top_tokens: int = 10, ctx: int = 128) -> dict:
    """Effects of the ablations on ``targets`` (layer, feature) and on the next-token distribution.

    Report: per target, mean clean and ablated activation over text positions; over all scored
    positions, KL(clean || ablated) of the next-token distribution and the tokens whose log-probability
    rose or fell most on average; at each prompt's last token, the same token lists.
    """
    import nnsight

    targets = list(targets)
    _check(lm, saes, list(ablations), targets)
    follow_model(saes, lm)
    if not prompts:
        raise ScSteerError("ablation_experiment: the prompt set is empty")
    layers = sorted({a.layer for a in ablations} | {t[0] for t in targets})
    strings = lm.tokenizer.convert_ids_to_tokens
    sums = {t: [0.0, 0.0] for t in targets}
    kl_sum, n_pos, n_scored = 0.0, 0, 0
    dlogp_sum = torch.zeros(len(lm.tokenizer), dtype=torch.float64)
    last = []
    rows = iter_rows(prompts, lm.tokenizer, ctx)
    for b in iter_batches(rows, 8, ctx, pad_token_id(lm.tokenizer)):
        keep = b.keep.to(lm.device)
        inputs = {"input_ids": b.input_ids.to(lm.device), "attention_mask": b.attention_mask.to(lm.device)}
        results = {}
        for edited in (False, True):
            saved: dict = {}
            with torch.no_grad(), lm.trace(inputs):
                for layer in layers:
                    site = Site("resid_post", layer)
                    sae = saes[str(site)]
                    env = lm.envoy(site)
                    out = env.output
                    h = unwrap(out)
                    mine = [a for a in ablations if a.layer == layer]
                    if edited and mine:
                        f = sae.encode(h.float())
                        delta = torch.zeros_like(h, dtype=torch.float32)
                        for a in mine:
                            fi = f[..., a.feature]
                            scale = edit_amount(fi, a.mode, a.value) * keep
                            if a.where == "active":
                                scale = scale * (fi > 0)
                            delta = add_along(delta, scale, sae.W_dec[a.feature])
                        h = (h.float() + delta).to(h.dtype)
                        env.output = rewrap(out, h)
                    for t in targets:
                        if t[0] == layer:
                            saved[t] = nnsight.save(sae.encode(h.float())[..., t[1]])
                saved["logits"] = nnsight.save(lm.nn.output.logits)
            results[edited] = saved
        clean, abl = results[False], results[True]
        for t in targets:
            sums[t][0] += float(clean[t][keep].sum())
            sums[t][1] += float(abl[t][keep].sum())
        n_pos += int(keep.sum())
        scored = keep  # every text position predicts a next token
        lp_c = torch.log_softmax(clean["logits"].float(), -1)
        lp_a = torch.log_softmax(abl["logits"].float(), -1)
        kl_sum += float((lp_c.exp() * (lp_c - lp_a)).sum(-1)[scored].sum())
        dlogp_sum += (lp_a - lp_c)[scored].double().sum(0).cpu()
        n_scored += int(scored.sum())
        lengths = b.attention_mask.sum(1) - 1
        for r in range(len(lengths)):
            d = (lp_a - lp_c)[r, lengths[r]]
            last.append({"row": int(b.row[r]),
                         "promoted": [[strings(int(i)), float(d[i])] for i in d.topk(top_tokens).indices],
                         "suppressed": [[strings(int(i)), float(d[i])] for i in (-d).topk(top_tokens).indices]})
    if n_pos == 0:
        raise ScSteerError("the prompts have no text tokens")
    mean_d = dlogp_sum / max(n_scored, 1)
    return {
        "ablations": [a.__dict__ for a in ablations],
        "targets": {node_id(layer, f): {"clean": s[0] / n_pos, "ablated": s[1] / n_pos, "delta": (s[1] - s[0]) / n_pos}
                    for (layer, f), s in sums.items()},
        "kl": kl_sum / max(n_scored, 1), "positions": n_pos,
        "promoted": [[strings(int(i)), float(mean_d[i])] for i in mean_d.topk(top_tokens).indices],
        "suppressed": [[strings(int(i)), float(mean_d[i])] for i in (-mean_d).topk(top_tokens).indices],
        "last_token": last,
    }
