"""TopK SAE: keep the k largest pre-activations (after ReLU), zero the rest; AuxK revives dead latents.

Loss = FVU + aux_coeff * AuxK, both normalised by the batch's variance about its mean. AuxK
reconstructs the main model's residual error ``e = x - x_hat`` (detached) from the top ``k_aux``
pre-activations of latents that have not fired for a while, decoded WITHOUT the decoder bias.

Training decodes sparsely: with k of d_sae latents active, ``x_hat = sum_j v_j W_dec[i_j] + b_dec`` is an
``embedding_bag`` over the k indices, so the decoder's forward and backward cost batch * k * d_in
instead of batch * d_sae * d_in. Inference (``encode``/``decode``) stays dense and simple.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SAE, TrainOut


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]]`` for every row, without building the dense code."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


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
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        e_hat = sparse_decode(idx, torch.relu(vals), sae.W_dec)
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

    def train_forward(self, x: torch.Tensor) -> TrainOut:
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        vals = torch.relu(vals)
        x_hat = sparse_decode(idx, vals, self.W_dec) + self.b_dec
        with torch.no_grad():
            counts = torch.bincount(idx[vals > 0], minlength=self.cfg.d_sae)
        return TrainOut(x_hat=x_hat, pre=pre, counts=counts)

    def loss(self, x, out, ctx):
        return fvu_and_auxk(self, x, out.x_hat, out.pre, ctx)
