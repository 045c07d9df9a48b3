"""Teacher-forced passes: a whole sequence (prompt and continuation) in one forward, with a recipe's
edits applied where generation applied them step by step; how steered continuations are read back."""
from __future__ import annotations

import torch

from ..models import LM
from ..sae import SAE
from ..sites import Site
from .generate import bos_positions, edit_hidden
from .recipe import Intervention


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
