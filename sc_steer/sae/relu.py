"""ReLU + L1, the original post's SAE: ``f = ReLU(pre)``, loss = MSE + lambda * sum_i f_i ||W_dec[i]||.

The L1 term is weighted by decoder row norms (so it cannot be dodged by shrinking f and growing
W_dec); lambda ramps up linearly over the warm-up. The decoder is a real parameter with its own
gradient: tied *initialisation* (W_enc = W_dec^T) is offered, a detached tied decoder is not.
"""
from __future__ import annotations

import torch

from .base import SAE


class ReluSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x, out, ctx):
        mse = (out.x_hat - x).pow(2).sum(-1).mean()
        l1 = (out.f * self.W_dec.norm(dim=1)).sum(-1).mean()
        coeff = ctx["l1_coeff"] * ctx["sparsity_scale"]
        return mse + coeff * l1, {"mse": mse.detach(), "l1": l1.detach()}
