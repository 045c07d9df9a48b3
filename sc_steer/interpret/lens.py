"""Logit lens for unit directions: which next tokens a direction promotes or suppresses.

A direction d in the residual stream reaches the logits as ``W_U (g * d)``, where g is the final
norm's gain (LayerNorm also centres d first; ``LM.final_norm_gain`` applies the family's quirks). The
norm's data-dependent 1/rms factor is a positive scalar per token, so it does not change the ranking.
"""
from __future__ import annotations

import torch

from ..models import LM


def final_norm_map(lm: LM):
    gain, centre = lm.final_norm_gain()

    def apply(d: torch.Tensor) -> torch.Tensor:
        if centre:
            d = d - d.mean(-1, keepdim=True)
        return d * gain

    return apply


def lens_topk(lm: LM, directions: torch.Tensor, k: int = 8) -> tuple[torch.Tensor, ...]:
    """For each row of ``directions [n, d_model]``: (promoted ids, their logits, suppressed ids, their logits),
    each ``[n, k]`` on the host. The products run in fp32 on the model's device, 1024 rows at a time."""
    W_U = lm.unembedding().float()  # [vocab, d_model]
    norm = final_norm_map(lm)
    parts = []
    for chunk in directions.split(1024):
        logits = norm(chunk.to(W_U.device, torch.float32)) @ W_U.T
        top, bottom = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        parts.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu()))
    if not parts:
        empty = torch.zeros(0, k)
        return empty.long(), empty, empty.long(), empty
    return tuple(torch.cat(p) for p in zip(*parts))


def logit_lens(lm: LM, directions: torch.Tensor, k: int = 8) -> list[dict]:
    """For each row of ``directions [n, d_model]``: top-k promoted and suppressed tokens with their logits."""
    up_ids, up_vals, down_ids, down_vals = (t.tolist() for t in lens_topk(lm, directions, k))
    pairs = lambda ids, vals: [[t, v] for t, v in zip(ids, vals)]  # noqa: E731
    return [{"promoted": pairs(up_ids[i], up_vals[i]), "suppressed": pairs(down_ids[i], down_vals[i])}
            for i in range(len(up_ids))]


def unit_directions(lm: LM, kind: str, site, sae=None) -> torch.Tensor:
    """Residual-stream write directions: SAE decoder rows, basis vectors, or MLP output columns."""
    if kind == "sae":
        return sae.W_dec.detach().float()
    if kind == "resid":
        return torch.eye(lm.d_model, device=lm.device)
    return lm.projection_weight(lm.module(site)).detach().float().T   # the MLP output projection's columns
