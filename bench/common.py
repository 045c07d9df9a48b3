"""Shared by the benchmarks: timing (interleaved medians, device synchronised) and the plain-torch SAE
training step that sc-steer's trainer is compared with."""
from __future__ import annotations

import statistics
import time

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def interleaved(fns, dev: torch.device, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Median wall time of each of ``fns``, run in turns (A B A B ...) so drift hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def timed(fn, dev: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, device synchronised."""
    return interleaved([fn], dev, repeats, warmup)[0]



# -- the plain-torch reference step -----------------------------------------------------------------
def dead_mask(d_sae: int, dev: torch.device) -> torch.Tensor:
    """A tenth of the latents dead (every tenth one): AuxK active with its full k_aux = d_in / 2 per token."""
    dead = torch.zeros(d_sae, dtype=torch.bool, device=dev)
    dead[::10] = True
    return dead


def plain_step_fn(arch: str, d_in: int, d_sae: int, k: int, dev: torch.device, autocast: bool, auxk: bool = False,
                  dead: torch.Tensor | None = None):
    """A plain-torch dense training step: encoder, activation, dense decoder, MSE (+ L1; + AuxK with
    ``auxk`` on the latents of ``dead``, by default a tenth of them), backward, Adam."""
    g = torch.Generator(device=dev).manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g, device=dev)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.contiguous().requires_grad_(), "b_enc": torch.zeros(d_sae, device=dev,
              requires_grad=True), "W_dec": W_dec.requires_grad_(),
              "b_dec": torch.zeros(d_in, device=dev, requires_grad=True)}
    theta = torch.full((d_sae,), 0.1, device=dev)
    dead = dead_mask(d_sae, dev) if dead is None else dead.to(dev)
    opt = torch.optim.Adam(params.values(), lr=1e-4, fused=dev.type == "cuda" or None)

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
            if arch == "topk":
                v, i = pre.topk(k, dim=-1)
                f = torch.zeros_like(pre).scatter(-1, i, v.relu())
            elif arch == "batchtopk":
                flat = pre.relu().flatten()
                v, i = flat.topk(k * x.shape[0])
                f = torch.zeros_like(flat).scatter(0, i, v).view_as(pre)
            elif arch == "jumprelu":
                f = pre * (pre > theta)
            else:
                f = pre.relu()
            x_hat = f @ params["W_dec"] + params["b_dec"]
            if auxk:
                masked = pre.masked_fill(~dead, float("-inf"))
                v, i = masked.topk(d_in // 2, dim=-1)
                e_hat = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ params["W_dec"]
        loss = (x_hat.float() - x).pow(2).sum(-1).mean()
        if auxk:
            loss = loss + (e_hat.float() - (x - x_hat.float()).detach()).pow(2).sum(-1).mean() / 8
        if arch == "relu":
            loss = loss + 1e-3 * f.float().sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
