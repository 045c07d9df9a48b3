"""A plain TopK + AuxK SAE trainer, independent of ``sc_steer.sae``: the yardstick the benchmark
puts beside our trainer at the same data and budget.

Written from the recipe of Gao et al. (2024) with nothing shared with the library: dense autograd,
Adam at a fixed learning rate, decoder rows at unit norm (parallel gradient removed), b_dec at the
data mean, encoder tied to the decoder at initialisation, a latent dead after ``dead_steps`` steps
without firing, AuxK on the top ``k_aux`` dead pre-activations with its loss divided by the energy of
the residual it reconstructs.
"""
from __future__ import annotations

import torch


class PlainTopK(torch.nn.Module):
    def __init__(self, d: int, n: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.dec = torch.nn.Parameter(w)                  # [n, d], unit rows
        self.enc = torch.nn.Parameter(w.T.clone())        # [d, n]
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.enc + self.b_enc

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pre(x)
        v, i = p.topk(self.k, dim=-1)
        return torch.zeros_like(p).scatter(-1, i, v.relu())


def train_plain_topk(x: torch.Tensor, n: int, k: int, steps: int = 10_000, batch: int = 256, lr: float = 1e-3,
                     dead_steps: int = 200, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                     seed: int = 0) -> PlainTopK:
    """Train on the rows of ``x`` (sampled with replacement, seeded) and return the model."""
    torch.manual_seed(seed)
    d = x.shape[1]
    k_aux = k_aux or d // 2
    sae = PlainTopK(d, n, k, seed)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since = torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        p = sae.pre(xb)
        v, i = p.topk(k, dim=-1)
        f = torch.zeros_like(p).scatter(-1, i, v.relu())
        x_hat = f @ sae.dec + sae.b_dec
        err = xb - x_hat
        loss = err.pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
        fired = (f > 0).any(0)
        since = torch.where(fired, torch.zeros_like(since), since + 1)
        dead = since > dead_steps
        n_dead = int(dead.sum())
        if n_dead:
            kk = min(k_aux, n_dead)
            pd = p.masked_fill(~dead, float("-inf"))
            va, ia = pd.topk(kk, dim=-1)
            fa = torch.zeros_like(p).scatter(-1, ia, va.relu())
            e = err.detach()
            aux = (fa @ sae.dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
            loss = loss + aux_coeff * aux
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            gd = sae.dec.grad
            gd -= (gd * sae.dec).sum(1, keepdim=True) * sae.dec
        opt.step()
        with torch.no_grad():
            sae.dec /= sae.dec.norm(dim=1, keepdim=True)
    return sae
