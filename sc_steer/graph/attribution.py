"""Attribution patching: a first-order estimate of the ablation effects, from gradients.

``attr[i, j] = mean over text positions of  grad_h f_j(n+1)(positions) . (v - f_i) W_dec[i]`` where the
gradient is of the target summed over all text positions (ablating at one position moves later ones
too). One backward pass of block n+1 per target gives the row for every source at once, so it ranks
many candidate sources cheaply; exact ablation (``measure.py``) then confirms the edges kept.
"""
from __future__ import annotations

import torch

from ..data import TokenBatch
from ..devices import follow_model
from ..models import LM
from ..sae import SAE
from .measure import capture_block_inputs, run_block


def attribution(lm: LM, layer: int, sae_n: SAE, sae_next: SAE, batches: list[TokenBatch],
                sources: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, T]`` attribution of zero-ablating each source on each target (all targets if None).

    With ``targets=None`` the objective is the total activation of all layer-(n+1) features, giving
    one column: how much each source drives layer n+1 overall.
    """
    follow_model((sae_n, sae_next), lm)
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
        # delta_i(pos) = -f_i(pos) W_dec[i] at text positions; attr = sum_pos grad(pos) . delta_i(pos)
        h_req = h.clone().requires_grad_(True)
        with torch.enable_grad():
            block_out = run_block_grad(lm, layer + 1, args, kwargs, h_req.to(args[0].dtype))
            g = sae_next.encode(block_out.float()) * keep[..., None]
            for c in range(cols):
                obj = g.sum() if targets is None else g[..., int(targets[c])].sum()
                (grad,) = torch.autograd.grad(obj, h_req, retain_graph=c < cols - 1)
                proj = grad @ W[sources.to(h.device)].T                         # [B, T, S]
                out[:, c] += (-(f_i * proj) * keep[..., None]).sum((0, 1)).double().cpu()
        count += int(keep.sum())
    return (out / max(count, 1)).float()


def run_block_grad(lm: LM, layer: int, args: tuple, kwargs: dict, hidden: torch.Tensor) -> torch.Tensor:
    """Block ``layer`` on the captured inputs with ``hidden`` swapped in, gradients enabled."""
    return run_block(lm, layer, args, kwargs, hidden, torch.arange(hidden.shape[0]))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))
