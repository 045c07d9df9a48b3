"""BatchTopK: while training, keep the top ``k * batch`` activations over the whole batch.

The number of active latents then varies per token (mean k). For inference, a single threshold
(an EMA of the smallest activation kept in each training batch) turns it into a per-token JumpReLU,
so encoding one token does not depend on the rest of the batch. Saved for SAELens as "jumprelu"
with that threshold repeated per latent.
"""
from __future__ import annotations

import torch

from .base import SAE
from .topk import fvu_and_auxk


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    needs_k = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated
        self.ema = 0.99

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)

    def train_encode(self, pre: torch.Tensor) -> torch.Tensor:
        h = torch.relu(pre)
        flat = h.reshape(-1)
        n_keep = min(self.cfg.k * h.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, vals).reshape_as(h)

    @torch.no_grad()
    def after_step(self, out) -> None:
        f = out.f
        pos = f[f > 0]
        if pos.numel() == 0:
            return
        m = pos.min()
        self.threshold.copy_(m if self.threshold < 0 else self.ema * self.threshold + (1 - self.ema) * m)

    def loss(self, x, out, ctx):
        return fvu_and_auxk(self, x, out.x_hat, out.pre, ctx)

    def thresholds(self):
        return [self.threshold]

    def state_for_saving(self):
        state = super().state_for_saving()
        state["threshold"] = self.threshold.clamp_min(0).expand(self.cfg.d_sae).float().contiguous().cpu()
        return state

    def load_state(self, tensors):
        super().load_state(tensors)
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"].float().max())
