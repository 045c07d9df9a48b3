"""Exact feature-to-feature effects from layer n to layer n+1, measured cheaply.

Ablating SAE feature i at layer n (error-preserving: ``h' = h + (v - f_i) W_dec[i]``, where v = 0 for
zero ablation, the feature's mean for mean ablation, or a chosen value for clamping) changes the
residual stream that block n+1 reads. Instead of one full forward per feature, the inputs of block
n+1 are captured once per prompt batch and only block n+1 is rerun, for K ablations at a time
stacked along the batch. Every layer-(n+1) SAE feature j is then read at every text position.

Per (i, j), over all text positions of all prompts:
  effect     = mean(f_j(ablated) - f_j(clean))          (weight = -effect: positive = i supports j)
  effect_std, count
  pre_delta  = mean change of j's pre-activation (ReLU/TopK make effects non-additive)
  skip       = mean change if only the residual skip carried the ablation (block n+1's own
               computation left as it was); through = effect - skip
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..data import TokenBatch
from ..devices import follow_model
from ..edits import edit_amount
from ..errors import ScSteerError
from ..models import LM, unwrap
from ..sae import SAE
from ..sites import Site

MODES = ("zero", "mean", "clamp")
WHERE = ("all", "active")


@dataclass
class PairEffects:
    """Effects of ablating each source feature of layer ``n`` on every feature of layer ``n + 1``."""

    layer: int
    sources: torch.Tensor            # [S] source feature ids
    effect: torch.Tensor             # [S, J]
    effect_std: torch.Tensor         # [S, J]
    pre_delta: torch.Tensor          # [S, J]
    skip: torch.Tensor               # [S, J]
    count: int                       # text positions measured
    clean_mean: torch.Tensor         # [J] mean clean activation of each target
    source_mean: torch.Tensor        # [S] mean clean activation of each source
    config: dict = field(default_factory=dict)

    @property
    def weight(self) -> torch.Tensor:
        return -self.effect

    @property
    def through(self) -> torch.Tensor:
        return self.effect - self.skip


def capture_block_inputs(lm: LM, layer: int, batch: TokenBatch) -> tuple[tuple, dict, torch.Tensor]:
    """Run the model once (no KV cache) and return block ``layer``'s (args, kwargs) and its output."""
    block = lm.module(Site("resid_post", layer))
    got: dict = {}

    def pre(_m, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs

    def post(_m, _args, out):
        got["out"] = unwrap(out)
        raise _StopForward

    h1 = block.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = block.register_forward_hook(post)
    try:
        with torch.no_grad():
            lm.hf(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device),
                  use_cache=False)
    except _StopForward:
        pass
    finally:
        h1.remove()
        h2.remove()
    return got["args"], got["kwargs"], got["out"]


class _StopForward(Exception):
    """Ends the capture forward right after the block of interest."""


def _rows(x, rows: torch.Tensor, b: int):
    """Select batch rows of batch-shaped tensors (first dim == b), recursively through tuples; tensors
    that broadcast over the batch (first dim 1) and non-tensors pass through."""
    if torch.is_tensor(x):
        return x[rows.to(x.device)] if x.dim() and x.shape[0] == b and b > 1 else x
    if isinstance(x, tuple):
        return tuple(_rows(v, rows, b) for v in x)
    return x


def run_block(lm: LM, layer: int, args: tuple, kwargs: dict, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Block ``layer`` on ``hidden [m, T, d]``, whose row r stands for row ``rows[r]`` of the captured batch
    (its mask, positions and other inputs are taken from there)."""
    b = args[0].shape[0]
    block = lm.module(Site("resid_post", layer))
    new_args = (hidden,) + tuple(_rows(a, rows, b) for a in args[1:])
    new_kwargs = {key: _rows(v, rows, b) for key, v in kwargs.items()}
    return unwrap(block(*new_args, **new_kwargs))


def ablation_scale(f_i: torch.Tensor, keep: torch.Tensor, mode: str, value: float | None = None,
                   means: torch.Tensor | None = None, where: str = "all") -> torch.Tensor:
    """``(v - f_i)`` per source and position: the multiple of ``W_dec[i]`` an ablation adds to the
    residual stream. ``f_i [k, B, T]``; v is 0 (zero), ``value`` (clamp) or ``means [k]`` (mean); zero off
    text positions, and where the source is silent when ``where == "active"``. Shared by the exact
    measurement and the attribution, so both estimate the same intervention."""
    v = means.to(f_i.device, f_i.dtype)[:, None, None] if mode == "mean" else value
    scale = edit_amount(f_i, mode, v) * keep
    if where == "active":
        scale = scale * (f_i > 0)
    return scale


def check_mode(mode: str, value: float | None, where: str) -> None:
    if mode not in MODES:
        raise ScSteerError(f"ablation mode {mode!r}: expected one of {', '.join(MODES)}")
    if where not in WHERE:
        raise ScSteerError(f"ablation positions {where!r}: expected one of {', '.join(WHERE)}")
    if mode == "clamp" and value is None:
        raise ScSteerError("clamp ablation needs a value")


def check_pair(lm: LM, layer: int, sae_n: SAE, sae_next: SAE) -> None:
    if not 0 <= layer < lm.n_layers - 1:
        raise ScSteerError(f"source layer {layer}: needs a next layer; the model has layers 0-{lm.n_layers - 1}, "
                           f"so n must be in 0-{lm.n_layers - 2}")
    lm.check_sae(Site("resid_post", layer), sae_n)
    lm.check_sae(Site("resid_post", layer + 1), sae_next)


@torch.no_grad()
def source_means(lm: LM, layer: int, sae: SAE, batches: list[TokenBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean activation (over text positions) and firing count of every layer-n feature on the prompts."""
    follow_model(sae, lm)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    n = 0
    for b in batches:
        args, _, _ = capture_block_inputs(lm, layer + 1, b)
        f = sae.encode(args[0][b.keep.to(args[0].device)].float())
        total += f.double().sum(0).cpu()
        fires += (f > 0).sum(0).cpu()
        n += len(f)
    if n == 0:
        raise ScSteerError("the prompt set has no text tokens")
    return (total / n).float(), fires


@torch.no_grad()
def measure_pair(lm: LM, layer: int, sae_n: SAE, sae_next: SAE, batches: Iterable[TokenBatch],
                 sources: torch.Tensor | list[int], *, mode: str = "zero", value: float | None = None,
                 where: str = "all", chunk: int = 16, max_rows: int = 64,
                 means: torch.Tensor | None = None) -> PairEffects:
    """Exact effects of ablating each of ``sources`` (layer ``layer``) on all features of ``layer + 1``."""
    check_pair(lm, layer, sae_n, sae_next)
    follow_model((sae_n, sae_next), lm)
    check_mode(mode, value, where)
    batches = list(batches)
    sources = torch.as_tensor(sources, dtype=torch.long).cpu()
    if len(sources) == 0:
        raise ScSteerError(f"no source features to ablate at layer {layer}")
    bad = sources[(sources < 0) | (sources >= sae_n.cfg.d_sae)]
    if len(bad):
        raise ScSteerError(f"unknown feature id {int(bad[0])} at layer {layer}: the SAE has features "
                           f"0-{sae_n.cfg.d_sae - 1}")
    if mode == "mean" and means is None:
        means, _ = source_means(lm, layer, sae_n, batches)
    S, J = len(sources), sae_next.cfg.d_sae
    acc = {k: torch.zeros(S, J, dtype=torch.float64) for k in ("sum", "sq", "skip")}
    dout = torch.zeros(S, lm.width(Site("resid_post", layer + 1)), dtype=torch.float64)
    clean_sum = torch.zeros(J, dtype=torch.float64)
    src_sum = torch.zeros(S, dtype=torch.float64)
    count = 0
    W = sae_n.W_dec.detach()
    for b in batches:
        args, kwargs, out = capture_block_inputs(lm, layer + 1, b)
        h = args[0]
        keep = b.keep.to(h.device)
        f_n = sae_n.encode(h.float())                                  # [B, T, Sn]
        pre_clean = sae_next.pre_acts(out.float())                     # [B, T, J]
        g_clean = sae_next.activate(pre_clean)
        clean_sum += (g_clean * keep[..., None]).sum((0, 1)).double().cpu()
        count += int(keep.sum())
        T = h.shape[1]
        for lo in range(0, S, chunk):
            ids = sources[lo:lo + chunk].to(h.device)
            f_i = f_n[..., ids].permute(2, 0, 1)                       # [k, B, T]
            src_sum[lo:lo + len(ids)] += (f_i * keep).sum((1, 2)).double().cpu()
            scale = ablation_scale(f_i, keep, mode, value, None if means is None else means[ids.cpu()], where)
            # Only (source, prompt) rows the ablation touches are rerun, and only positions at or after
            # the first touched one can change (causal attention): everything else has zero effect.
            rows_k, rows_b = (scale != 0).any(-1).nonzero(as_tuple=True)
            skip_dir = W[ids] @ sae_next.W_enc                         # [k, J]: a unit edit's effect on pre-acts
            part_sum, part_sq, part_skip = (torch.zeros(len(ids), J, device=h.device) for _ in range(3))
            part_dout = torch.zeros(len(ids), h.shape[-1], device=h.device)
            for r0 in range(0, len(rows_k), max_rows):
                rk, rb = rows_k[r0:r0 + max_rows], rows_b[r0:r0 + max_rows]
                sc = scale[rk, rb]                                     # [m, T]
                hin = (h[rb].float() + sc[..., None] * W[ids[rk]][:, None, :]).to(h.dtype)
                out_m = run_block(lm, layer + 1, args, kwargs, hin, rb).float()
                touched = sc != 0
                first = touched.float().argmax(1)
                changed = (torch.arange(T, device=h.device)[None] >= first[:, None]) & keep[rb]
                pm, pt = changed.nonzero(as_tuple=True)
                out_p = out_m[pm, pt]
                diff = sae_next.activate(sae_next.pre_acts(out_p)) - g_clean[rb[pm], pt]
                kk = rk[pm]
                part_sum.index_add_(0, kk, diff)
                part_sq.index_add_(0, kk, diff.pow(2))
                # pre-activations are linear in the block output: sum the output change, project once at the end
                part_dout.index_add_(0, kk, out_p - out.float()[rb[pm], pt])
                qm, qt = touched.nonzero(as_tuple=True)
                pre_skip = pre_clean[rb[qm], qt] + sc[qm, qt, None] * skip_dir[rk[qm]]
                part_skip.index_add_(0, rk[qm], sae_next.activate(pre_skip) - g_clean[rb[qm], qt])
            sl = slice(lo, lo + len(ids))
            acc["sum"][sl] += part_sum.double().cpu()
            acc["sq"][sl] += part_sq.double().cpu()
            acc["skip"][sl] += part_skip.double().cpu()
            dout[sl] += part_dout.double().cpu()
    if count == 0:
        raise ScSteerError("the prompt set has no text tokens")
    mean = acc["sum"] / count
    var = (acc["sq"] / count - mean.pow(2)).clamp_min(0)
    return PairEffects(layer=layer, sources=sources, effect=mean.float(), effect_std=var.sqrt().float(),
                       pre_delta=(dout / count @ sae_next.W_enc.detach().double().cpu()).float(), skip=(acc["skip"] / count).float(), count=count,
                       clean_mean=(clean_sum / count).float(), source_mean=(src_sum / count).float(),
                       config={"mode": mode, "value": value, "where": where})
