"""ReLU + L1, the original post's SAE: ``f = ReLU(pre)``, loss = MSE + lambda * sum_i f_i.

The penalty is the plain L1 norm of the code. It cannot be dodged by shrinking f and growing W_dec
because the trainer keeps every decoder row at unit norm (the radial part of the gradient is removed
and rows are renormalised after each step); the norm-weighted form ``sum_i f_i ||W_dec[i]||``
(Anthropic's April 2024 update) is the same number under that constraint, so it is written here as
the product with the row norms only to stay right if the constraint is ever lifted. lambda ramps up
linearly over the warm-up. The decoder is a real parameter with its own gradient: tied
*initialisation* (W_enc = W_dec^T) is offered, a detached tied decoder is not.

The penalty is indifferent to how an activation is shared between latents with equal decoder rows,
so twins persist and dead latents stay dead; by default both are resampled (``sae/resample.py``).
How the default ``l1_coeff`` was chosen: ``bench/toy_recovery_results.md``.
"""
from __future__ import annotations

import torch

from .base import SAE


class ReluSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x, out, inputs):
        batch = inputs.batch
        mse = batch.mean_rows((out.x_hat - x).pow(2).sum(-1))
        l1 = batch.mean_rows((out.f * self.W_dec.norm(dim=1)).sum(-1))
        coeff = inputs.l1_coeff * inputs.sparsity_scale
        return mse + coeff * l1, {"mse": mse.detach(), "l1": l1.detach()}
