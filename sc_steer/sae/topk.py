"""TopK SAE: keep the k largest pre-activations (after ReLU), zero the rest; AuxK revives dead latents.

Loss = FVU + aux_coeff * AuxK, both normalised by the batch's variance about its mean. AuxK
reconstructs the main model's residual error ``e = x - x_hat`` (detached) from the top ``k_aux``
pre-activations of latents that have not fired for a while, decoded WITHOUT the decoder bias.
"""
from __future__ import annotations

import torch

from .base import SAE


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


def fvu_and_auxk(sae: SAE, x, x_hat, pre, ctx) -> tuple[torch.Tensor, dict[str, float]]:
    """Shared by TopK and BatchTopK."""
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-8)
    fvu = (x_hat - x).pow(2).sum() / total_var
    parts = {"fvu": fvu.item()}
    dead = ctx.get("dead")
    loss = fvu
    if dead is not None and bool(dead.any()) and ctx.get("aux_coeff", 0) > 0:
        k_aux = min(int(ctx["k_aux"]), int(dead.sum()))
        masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
        f_aux = topk_relu(masked, k_aux)
        e_hat = f_aux @ sae.W_dec
        e = (x - x_hat).detach()
        auxk = (e_hat - e).pow(2).sum() / total_var
        loss = loss + ctx["aux_coeff"] * auxk
        parts["auxk"] = auxk.item()
    return loss, parts


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"
    needs_k = True

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu(pre, self.cfg.k)

    def loss(self, x, x_hat, f, pre, ctx):
        return fvu_and_auxk(self, x, x_hat, pre, ctx)
