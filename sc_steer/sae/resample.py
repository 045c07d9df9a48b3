"""Resampling of dead and duplicated latents: give wasted latents a second start where the SAE fails.

Bricken et al. (2023) re-initialise latents that stopped firing to inputs the SAE reconstructs
worst. A latent can also be wasted while alive: ReLU + L1 does not care how an activation is split
between two latents with the same decoder row (the penalty of ``a`` equals that of ``a/2 + a/2``),
so twins that found the same frequent feature early stay twins, and the features nobody took are
never learned (on the heavy-tailed toy at ``l1_coeff`` 1, 65 of 256 latents had a twin above cosine
0.9). Here both kinds are resampled:

* dead: no firing since the last round (``TrainConfig.resample_tokens``, by default a two-hundredth of
  the run; AuxK's own dead window is shorter);
* duplicate: decoder row at cosine > ``DUPLICATE_COS`` with a latent that fired more often.

Each picked latent gets a residual ``e = x - x_hat`` of the current batch, drawn with probability
proportional to ``||e||^4`` (the square of the row's loss, as Bricken et al.): decoder row
``e / ||e||`` (the residual rather than the input: what the SAE is missing, not what it already
has), encoder column the same direction times 0.2 times the mean norm of the other encoder columns,
encoder bias 0, and Adam's moments of those entries zeroed. Rows are drawn without replacement; when
more latents are picked than the batch has rows, the rest wait for the next round.
"""
from __future__ import annotations

import torch

from .base import SAE
from .batch import WHOLE, WholeBatch

DUPLICATE_COS = 0.95
ENCODER_SCALE = 0.2
_BLOCK = 4096          # decoder rows compared per block (d_sae x d_sae never held at once)


@torch.no_grad()
def duplicates(W_dec: torch.Tensor, fire_count: torch.Tensor, cos: float = DUPLICATE_COS) -> torch.Tensor:
    """Mask of latents whose (unit) decoder row is within ``cos`` of a row that fired more often (ties:
    the lower index is kept), so of each group of twins exactly one stays."""
    n = W_dec.shape[0]
    w = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if w.is_cuda:   # d_sae^2 d_in: 35 TFLOP at 65k x 4096, seconds in fp32; bf16's ~1e-3 error is far from the cut
        w = w.to(torch.bfloat16)
    order = torch.arange(n, device=W_dec.device)
    out = torch.zeros(n, dtype=torch.bool, device=W_dec.device)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        sim = w[lo:hi] @ w.T
        c = fire_count[lo:hi, None]
        stronger = (fire_count[None, :] > c) | ((fire_count[None, :] == c) & (order[None, :] < order[lo:hi, None]))
        out[lo:hi] = (sim.masked_fill(~stronger, -2.0) > cos).any(dim=1)
    return out


@torch.no_grad()
def resample(sae: SAE, opt: torch.optim.Optimizer, picked: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
             gen: torch.Generator, batch: WholeBatch = WHOLE) -> torch.Tensor:
    """Re-initialise the latents in the mask ``picked`` from residuals of the batch (``x``, ``x_hat`` in
    training units; ``gen``: a CPU generator, the same on every rank). Returns the indices reset."""
    idx = torch.nonzero(picked).flatten()
    if len(idx) == 0:
        return idx
    e = (x - x_hat.to(x.dtype)).float()
    weight = batch.all_rows(e.pow(2).sum(1).pow(2)).cpu().double()
    n = min(len(idx), int((weight > 0).sum()))
    if n == 0:
        return idx[:0]
    idx = idx[:n]
    rows = torch.multinomial(weight, n, replacement=False, generator=gen)
    dirs = batch.rows_at(e, rows)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=picked.device)
    alive[idx] = False
    enc_norm = sae.W_enc.norm(dim=0)[alive].mean() if alive.any() else sae.W_enc.new_tensor(1.0)
    sae.W_dec[idx] = dirs.to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (dirs * ENCODER_SCALE * enc_norm).T.to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0
    for p, where in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        state = opt.state.get(p)
        for key in ("exp_avg", "exp_avg_sq"):
            if state and key in state:
                state[key][where] = 0
    return idx
