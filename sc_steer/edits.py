"""The one formula behind every feature edit, in steering, ablation graphs and ablation experiments.

Editing SAE feature i at a position moves the residual stream along the feature's decoder row:
``h' = h + a * W_dec[i]``, where ``a`` depends on the feature's current activation ``f_i(h)``:

    add          a = v              a fixed amount (steering: v is the coefficient)
    remove/zero  a = -f_i           the feature ablated to 0
    clamp/mean   a = v - f_i        the feature set to v (mean ablation: v = its mean)
    scale        a = (v - 1) f_i    the feature multiplied by v

Only the chosen feature's contribution changes: the SAE's reconstruction error and every other
feature's contribution stay in ``h`` (error-preserving), which is what makes an edit a clean
intervention on one feature.
"""
from __future__ import annotations

import torch

EDIT_MODES = ("add", "remove", "zero", "clamp", "mean", "scale")


def edit_amount(f: torch.Tensor, mode: str, value: float | torch.Tensor | None = None) -> torch.Tensor:
    """``a`` of the table above at every position of ``f`` (the feature's activation; ``value`` a number
    or a tensor that broadcasts against ``f``)."""
    if mode == "add":
        return torch.zeros_like(f) + value
    if mode in ("remove", "zero"):
        return -f
    if mode in ("clamp", "mean"):
        return value - f
    if mode == "scale":
        return (value - 1) * f
    raise ValueError(f"edit mode {mode!r}: expected one of {', '.join(EDIT_MODES)}")


def add_along(h: torch.Tensor, amount: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``h + amount[..., None] * direction`` (``h [..., d]``, ``amount [...]``, ``direction [d]``)."""
    return h + amount[..., None] * direction
