"""Logit lens for unit directions: which next tokens a direction promotes or suppresses.

A direction d in the residual stream reaches the logits as ``W_U (g * d)``, where g is the final
norm's gain (LayerNorm also centres d first; Gemma's RMSNorm scales by 1 + weight). The norm's
data-dependent 1/rms factor is a positive scalar per token, so it does not change the ranking.
"""
from __future__ import annotations

import torch

from ..models import LM


def final_norm_map(lm: LM):
    norm = lm._get(lm.adapter.final_norm)
    weight = getattr(norm, "weight", None)
    gain = torch.ones(lm.d_model, device=lm.device) if weight is None else weight.detach().float()
    if "gemma" in type(norm).__name__.lower():
        gain = 1 + gain
    centre = isinstance(norm, torch.nn.LayerNorm)

    def apply(d: torch.Tensor) -> torch.Tensor:
        if centre:
            d = d - d.mean(-1, keepdim=True)
        return d * gain

    return apply


def logit_lens(lm: LM, directions: torch.Tensor, k: int = 8) -> list[dict]:
    """For each row of ``directions [n, d_model]``: top-k promoted and suppressed tokens with their logits.
    The products run in fp32 on the model's device; only the top-k lists come back to the host."""
    W_U = lm._get(lm.adapter.unembed).weight.detach().float()  # [vocab, d_model]
    norm = final_norm_map(lm)
    out = []
    for chunk in directions.split(1024):
        logits = norm(chunk.to(W_U.device, torch.float32)) @ W_U.T
        top = [t.cpu().tolist() for t in logits.topk(k, dim=-1)]
        bottom = [t.cpu().tolist() for t in (-logits).topk(k, dim=-1)]
        for i in range(len(chunk)):
            out.append({"promoted": [[t, v] for v, t in zip(top[0][i], top[1][i])],
                        "suppressed": [[t, -v] for v, t in zip(bottom[0][i], bottom[1][i])]})
    return out


def unit_directions(lm: LM, kind: str, site, sae=None) -> torch.Tensor:
    """Residual-stream write directions: SAE decoder rows, basis vectors, or MLP output columns."""
    if kind == "sae":
        return sae.W_dec.detach().float()
    if kind == "resid":
        return torch.eye(lm.d_model, device=lm.device)
    down = lm.module(site)  # the MLP output projection: nn.Linear [d_model, hidden] or Conv1D [hidden, d_model]
    w = down.weight.detach().float()
    return w.T if isinstance(down, torch.nn.Linear) else w
