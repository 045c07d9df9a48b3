"""JumpReLU: ``f = h * H(h - theta)`` with a learned per-latent threshold and an L0 penalty.

H has no useful gradient, so theta learns through straight-through pseudo-derivatives with a
rectangle kernel of bandwidth ``eps`` (Rajamanoharan et al., 2024):
    d f / d theta  ~ -(theta / eps) * K((h - theta) / eps)
    d H / d theta  ~ -(1 / eps)     * K((h - theta) / eps)
theta is parametrised as exp(log_theta) and kept in fp32.

Defaults (``SAETrainConfig``): initial theta 1.0 and bandwidth 0.5, in the trainer's units (inputs
scaled to norm sqrt(d_in), so feature values are O(1)), where the paper's 0.001 for both (SAELens's
defaults too) leaves theta unable to rise within a run (the comparison: bench/toy_recovery_results.md).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import SAE, StepInputs


def _kernel(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, theta, eps):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_h = g * (h > theta).to(h.dtype)
        grad_theta = (-(theta / eps) * _kernel((h - theta) / eps) * g).sum(0)
        return grad_h, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, theta, eps):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        return None, (-(1.0 / eps) * _kernel((h - theta) / eps) * g).sum(0), None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    has_threshold = True

    def __init__(self, cfg, init_threshold: float = 1.0, bandwidth: float = 0.5):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(init_threshold), dtype=torch.float32))
        self.bandwidth = bandwidth

    def set_training_options(self, scfg, fresh: bool) -> None:
        self.bandwidth = scfg.jumprelu_bandwidth
        if fresh:
            with torch.no_grad():
                self.log_threshold.fill_(math.log(scfg.jumprelu_threshold))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold).to(pre.dtype)

    def train_encode(self, pre: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        return _JumpReLU.apply(pre.reshape(-1, pre.shape[-1]), self.threshold, self.bandwidth).reshape_as(pre)

    def loss(self, x, out, inputs):
        batch = inputs.batch
        mse = batch.mean_rows((out.x_hat - x).pow(2).sum(-1))
        pre = out.pre
        l0 = batch.mean_rows(_Step.apply(pre.reshape(-1, pre.shape[-1]), self.threshold, self.bandwidth).sum(-1))
        coeff = inputs.l0_coeff * inputs.sparsity_scale
        return mse + coeff * l0, {"mse": mse.detach(), "l0_loss": l0.detach()}

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        super().fold_input_scale(s)
        self.log_threshold.sub_(math.log(s))

    def state_for_saving(self):
        state = super().state_for_saving()
        state["threshold"] = self.threshold.detach().float().contiguous().cpu()
        return state

    def load_state(self, tensors):
        super().load_state(tensors)
        with torch.no_grad():
            self.log_threshold.copy_(tensors["threshold"].float().clamp_min(1e-30).log())
