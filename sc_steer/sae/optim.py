"""The optimiser of one SAE: Adam, gradient clipping folded into fused Adam's own pass, and the
learning-rate schedule (linear warm-up, constant, linear decay to zero)."""
from __future__ import annotations

import torch

from .base import SAE


def make_optimizer(sae: SAE, lr: float) -> torch.optim.Adam:
    """Adam; on CUDA the fused kernel (one pass over parameters, gradients and moments)."""
    fused = sae.W_dec.device.type == "cuda"
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused or None)


def clip_gradients(opt: torch.optim.Optimizer, params, max_norm: float) -> None:
    """Scale the gradients so their total norm is at most ``max_norm`` (as ``clip_grad_norm_``). With fused
    Adam the scaling happens inside the optimiser's own pass over the gradients (its ``grad_scale``, by
    which it divides each gradient; the same hook ``GradScaler`` uses): one read and one write of every
    gradient fewer, and no host sync."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if opt.defaults.get("fused"):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        opt.grad_scale = ((norm + 1e-6) / max_norm).clamp_min(1.0).float()
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def lr_factor(step: int, steps: int, warmup: float, decay: float) -> float:
    """Linear warm-up (<= 1,000 steps), constant, then linear decay to zero over the last ``decay``."""
    w = min(1000, max(1, int(warmup * steps)))
    if step < w:
        return (step + 1) / w
    d0 = int((1 - decay) * steps)
    if decay > 0 and step >= d0:
        return max(0.0, (steps - step) / max(1, steps - d0))
    return 1.0
