"""Gated SAE (Rajamanoharan et al., 2024), for inference: loaded from SAELens and dictionary_learning
files, not trained here.

    pi   = (x - b_dec) W_enc                                  shared encoder
    gate = 1[pi + b_gate > 0]                                 which latents are on
    mag  = relu(pi * exp(r_mag) + b_mag)                      how strongly
    f    = gate * mag

``b_gate`` is the base class's ``b_enc``, so ``pre_acts`` is the gate's pre-activation and every
tool that reads pre-activations sees the gate.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SAE


class GatedSAE(SAE):
    architecture = "gated"
    saelens_architecture = "gated"
    trainable = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return self._combine(pre - self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The shared encoder product computed once, not recovered from the gate's pre-activation."""
        flat = x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype)
        pi = (flat - self.b_dec) @ self.W_enc
        return self._combine(pi).reshape(*x.shape[:-1], pi.shape[-1])

    def _combine(self, pi: torch.Tensor) -> torch.Tensor:
        return (pi + self.b_enc > 0).to(pi.dtype) * torch.relu(pi * self.r_mag.exp() + self.b_mag)

    def thresholds(self) -> list[torch.Tensor]:
        return [self.b_mag]     # in activation units, like the biases: scaled with the input

    def state_for_saving(self):
        state = super().state_for_saving()
        state["r_mag"], state["b_mag"] = self._save_tensor("r_mag"), self._save_tensor("b_mag")
        return state

    def load_state(self, tensors):
        super().load_state(tensors)
        with torch.no_grad():
            self.r_mag.copy_(tensors["r_mag"])
            self.b_mag.copy_(tensors["b_mag"])
