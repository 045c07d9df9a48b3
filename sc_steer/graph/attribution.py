"""Attribution patching: a first-order estimate of the ablation effects, from gradients.

``attr[i, j] = mean over text positions of  grad_h f_j(n+1)(positions) . (v - f_i) W_dec[i]`` where the
gradient is of the target summed over all text positions (ablating at one position moves later ones
too), and ``(v - f_i)`` is the very edit the exact measurement makes (``measure.ablation_scale``: the
same mode, value, means and ``where`` mask). One backward pass of block n+1 per target gives the row
for every source at once, so it ranks many candidate sources cheaply; exact ablation (``measure.py``)
then confirms the edges kept.

Sign: like ``PairEffects.effect``, attribution estimates ablated minus clean; an edge's ``weight`` is
minus the effect (positive: the source supports the target).
"""
from __future__ import annotations

import torch

from ..data import TokenBatch
from ..devices import follow_model
from ..models import LM
from ..sae import SAE
from .measure import (
    ablation_scale,
    capture_block_inputs,
    check_mode,
    run_block,
    source_means,
)


def attribution(lm: LM, layer: int, sae_n: SAE, sae_next: SAE, batches: list[TokenBatch],
                sources: torch.Tensor, targets: torch.Tensor | None = None, *, mode: str = "zero",
                value: float | None = None, where: str = "all", means: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, T]`` attribution of ablating each source (``mode``/``value``/``where`` as in ``measure_pair``)
    on each target (all targets if None); ``means [d_sae]`` for mean ablation (computed if None).

    With ``targets=None`` the objective is the total activation of all layer-(n+1) features, giving
    one column: how much each source drives layer n+1 overall.
    """
    follow_model((sae_n, sae_next), lm)
    check_mode(mode, value, where)
    sources = torch.as_tensor(sources, dtype=torch.long).cpu()
    if mode == "mean" and means is None:
        means, _ = source_means(lm, layer, sae_n, batches)
    src_means = None if means is None else means[sources]
    cols = 1 if targets is None else len(targets)
    out = torch.zeros(len(sources), cols, dtype=torch.float64)
    count = 0
    W = sae_n.W_dec.detach()
    for b in batches:
        args, kwargs, _ = capture_block_inputs(lm, layer + 1, b)
        h = args[0].detach().float()
        keep = b.keep.to(h.device)
        with torch.no_grad():
            f_i = sae_n.encode(h)[..., sources.to(h.device)]                   # [B, T, S]
            scale = ablation_scale(f_i.permute(2, 0, 1), keep, mode, value, src_means, where).permute(1, 2, 0)
        # delta_i(pos) = scale_i(pos) W_dec[i]; attr = sum_pos grad(pos) . delta_i(pos)
        h_req = h.clone().requires_grad_(True)
        with torch.enable_grad():
            block_out = run_block_grad(lm, layer + 1, args, kwargs, h_req.to(args[0].dtype))
            g = sae_next.encode(block_out.float()) * keep[..., None]
            for c in range(cols):
                obj = g.sum() if targets is None else g[..., int(targets[c])].sum()
                (grad,) = torch.autograd.grad(obj, h_req, retain_graph=c < cols - 1)
                proj = grad @ W[sources.to(h.device)].T                         # [B, T, S]
                out[:, c] += (scale * proj).sum((0, 1)).double().cpu()
        count += int(keep.sum())
    return (out / max(count, 1)).float()


def run_block_grad(lm: LM, layer: int, args: tuple, kwargs: dict, hidden: torch.Tensor) -> torch.Tensor:
    """Block ``layer`` on the captured inputs with ``hidden`` swapped in, gradients enabled."""
    return run_block(lm, layer, args, kwargs, hidden, torch.arange(hidden.shape[0]))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))
