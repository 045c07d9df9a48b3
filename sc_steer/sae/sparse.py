"""Training-time maps of a k-sparse code, with gradients that cost batch * k * d_in instead of
batch * d_sae * d_in.

A TopK code is ``idx [B, k]`` (which latents) and ``vals [B, k]`` (their values). Two maps need it:

* ``select(pre, idx, x, W_enc, b_enc, b_dec)``: the selected pre-activations. The forward pass only
  gathers from the dense ``pre`` (computed without autograd); the backward pass gives the encoder's
  gradients from the k selected entries per token: ``dW_enc[:, j] = sum_b g[b, j] (x_b - b_dec)``.
* ``decode(idx, vals, W_dec)``: ``sum_j vals[:, j] W_dec[idx[:, j]]``; backward gives ``d vals`` (a
  gathered dot product) and ``dW_dec[j] = sum_b vals[b, j] g_b``.

With many entries per row (AuxK's k_aux = d_in / 2 dead latents per token) gathering rows costs more
than dense products, so both maps scatter the code into a dense ``[B, d_sae]`` matrix and multiply
(:func:`runs_dense`).

Both weight gradients are the same operation, :func:`scatter_rows`: add ``coef * dense[row]`` into
row ``col`` of a ``[d_sae, d]`` output. On CUDA it runs as a Triton kernel over latents sorted into
segments (no atomics, every output row written once); on the CPU as one COO-times-dense product; with
``SC_STEER_KERNELS=torch`` on other devices as chunked ``index_add_`` (the reference the tests compare
the kernel with). The decoder's value gradient is a sampled dense product on the CPU.

:func:`kernels` picks the path: Triton on CUDA, these sparse PyTorch ops on the CPU, the autograd path
elsewhere (``bench/train.py`` times them against a plain dense step).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ..errors import ScSteerError

CHUNK_ELEMENTS = 1 << 26  # the torch paths materialise at most this many [rows, d] elements at a time
# Entries per row, as a share of d_sae, from which the maps below run as dense products, per device type.
# GPU: gathering ``e`` rows of a [d_sae, d] weight reads e * d values, a dense product costs 2 * d_sae * d
# FLOPs; at ~3 TB/s against ~800 bf16 TFLOP/s (H100/H200) the gather wins below about d_sae / 260 entries
# per row (TopK's k = 64 of 65,536 stays sparse, AuxK's k_aux = 2,048 goes dense). CPU: the sparse
# products (COO times dense, sampled dense-dense) beat dense ones up to about a quarter of d_sae.
DENSE_FROM = {"cpu": 1 / 4, "cuda": 1 / 256}


def runs_dense(entries_per_row: int, n_latents: int, device: torch.device) -> bool:
    """Whether a map over ``entries_per_row`` selected latents of ``n_latents`` is cheaper as dense products."""
    return entries_per_row >= DENSE_FROM.get(device.type, DENSE_FROM["cuda"]) * n_latents


def densify(idx: torch.Tensor, vals: torch.Tensor, n_latents: int) -> torch.Tensor:
    """``[B, n_latents]`` with ``vals`` added at ``idx`` (a latent listed twice in a row adds up)."""
    return torch.zeros(idx.shape[0], n_latents, device=vals.device, dtype=vals.dtype).scatter_add_(1, idx, vals)


def kernels(device: torch.device) -> str:
    """The TopK training path on ``device``: ``triton`` (sparse, Triton kernels: CUDA), ``torch`` (sparse,
    PyTorch ops: the CPU's default, where sparse-dense products are fast) or ``autograd`` (dense encoder
    backward, ``embedding_bag`` decoder: other devices). Set ``SC_STEER_KERNELS`` to auto (default),
    triton, torch or autograd."""
    choice = os.environ.get("SC_STEER_KERNELS", "auto")
    if choice not in ("auto", "torch", "triton", "autograd"):
        raise ScSteerError(f"SC_STEER_KERNELS={choice!r}: expected auto, triton, torch or autograd")
    if choice in ("torch", "autograd"):
        return choice
    if device.type == "cuda":
        from . import triton_kernels

        if triton_kernels.available():
            return "triton"
    if choice == "triton" and device.type == "cuda":
        raise ScSteerError("SC_STEER_KERNELS=triton: Triton is not importable here")
    return "torch" if device.type == "cpu" else "autograd"


def _chunks(n_rows: int, per_row: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    for i in range(0, n_rows, step):
        yield slice(i, min(n_rows, i + step))


def scatter_rows(idx: torch.Tensor, coef: torch.Tensor, dense: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[idx[b, j]] += coef[b, j] * dense[b]``, accumulated in fp32, as a new ``[n_out, d]`` tensor."""
    if kernels(dense.device) == "triton":
        from .triton_kernels import scatter_rows as triton_scatter_rows

        return triton_scatter_rows(idx, coef, dense, n_out)
    return scatter_rows_torch(idx, coef, dense, n_out)


def scatter_rows_torch(idx: torch.Tensor, coef: torch.Tensor, dense: torch.Tensor, n_out: int) -> torch.Tensor:
    """``scatter_rows`` with PyTorch ops. On the CPU one sparse-dense product: the code as a ``[n_out, B]``
    COO matrix times ``dense`` (about 8x faster than a dense product at the demo's shape); elsewhere
    chunked ``index_add_`` (the reference the Triton kernel is checked against)."""
    k, d = idx.shape[1], dense.shape[1]
    if dense.device.type == "cpu":
        rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(k)
        code = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), coef.reshape(-1).float(),
                                       (n_out, idx.shape[0]))
        return torch.sparse.mm(code, dense.float())
    out = torch.zeros(n_out, d, device=dense.device, dtype=torch.float32)
    for rows in _chunks(idx.shape[0], k * d):
        contrib = coef[rows].float().unsqueeze(-1) * dense[rows].float().unsqueeze(1)   # [r, k, d]
        out.index_add_(0, idx[rows].reshape(-1), contrib.reshape(-1, d))
    return out


def row_dot(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W @ v`` in fp32 (``v`` [cols]): the Triton kernel on the ``triton`` path, else ``torch.mv`` in W's dtype."""
    if kernels(W.device) == "triton":
        from .triton_kernels import row_dot as triton_row_dot

        return triton_row_dot(W, v)
    return (W @ v.to(W.dtype)).float()


def gather_dot(idx: torch.Tensor, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = <g_b, W[idx[b, j]]>`` in W's dtype, without a ``[B, k, d]`` tensor larger than a chunk
    (the Triton kernel on the ``triton`` path; see :func:`gather_dot_torch`)."""
    if kernels(W.device) == "triton":
        from .triton_kernels import gather_dot as triton_gather_dot

        return triton_gather_dot(idx, W, g).to(W.dtype)
    return gather_dot_torch(idx, W, g)


def gather_dot_torch(idx: torch.Tensor, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``gather_dot`` with PyTorch ops. On the CPU in fp32, ``g @ W.T`` sampled at the code's entries
    (``torch.sparse.sampled_addmm`` over a CSR pattern: only the B * k products are computed); elsewhere
    rows gathered a chunk at a time, then a batched product."""
    if W.device.type == "cpu" and W.dtype == torch.float32:
        B, k = idx.shape
        with warnings.catch_warnings():   # "sparse CSR support is in beta": the sampled product is what is used
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(torch.arange(0, B * k + 1, k, device=idx.device), idx.reshape(-1),
                                              torch.zeros(B * k, device=W.device, dtype=W.dtype), size=(B, W.shape[0]))
        return torch.sparse.sampled_addmm(pattern, g.to(W.dtype), W.T, beta=0.0).values().view(B, k)
    out = torch.empty(idx.shape, device=W.device, dtype=W.dtype)
    g = g.to(W.dtype)
    for rows in _chunks(idx.shape[0], idx.shape[1] * W.shape[1]):
        out[rows] = torch.bmm(W[idx[rows]], g[rows].unsqueeze(-1)).squeeze(-1)
    return out


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, vals, W):
        W_lp = W if W.dtype == vals.dtype else W.to(vals.dtype)   # one cast per step, not per row read
        ctx.w_dtype = W.dtype
        ctx.dense = runs_dense(idx.shape[1], W.shape[0], W.device)
        with torch.autocast(W.device.type, enabled=False):
            if ctx.dense:
                code = densify(idx, vals, W.shape[0])
                ctx.save_for_backward(idx, code, W_lp)
                return code @ W_lp
            ctx.save_for_backward(idx, vals, W_lp)
            return F.embedding_bag(idx, W_lp, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g):
        idx, vals_or_code, W_lp = ctx.saved_tensors
        grad_vals = grad_W = None
        if ctx.dense:
            code, g = vals_or_code, g.to(W_lp.dtype)
            if ctx.needs_input_grad[1]:
                grad_vals = (g @ W_lp.T).gather(1, idx).to(code.dtype)
            if ctx.needs_input_grad[2]:
                grad_W = (code.T @ g).to(ctx.w_dtype)
            return None, grad_vals, grad_W
        vals = vals_or_code
        if ctx.needs_input_grad[1]:
            grad_vals = gather_dot(idx, W_lp, g).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows(idx, vals, g, W_lp.shape[0]).to(ctx.w_dtype)
        return None, grad_vals, grad_W


@torch.no_grad()
def low_precision_pre_acts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor):
    """``(x - b_dec) W_enc + b_enc`` without autograd, in the autocast dtype when autocast is on (one
    ``addmm`` with the bias fused; the pre-activations, the top-k and everything selected from them
    stay in bf16, halving their memory traffic). Returns it and the low-precision ``W_enc`` (kept for
    the backward pass)."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else W_enc.dtype
    W_lp = W_enc.to(dtype)
    bias = (b_enc - (b_dec.to(dtype) @ W_lp).float()).to(dtype)
    return torch.addmm(bias, x.to(dtype), W_lp), W_lp


class _Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, idx, x, W_enc, b_enc, b_dec, W_lp):
        ctx.save_for_backward(idx, x, W_lp, b_dec)
        ctx.w_dtype = W_enc.dtype
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g):
        idx, x, W_enc, b_dec = ctx.saved_tensors  # W_enc: its low-precision copy
        d_sae = W_enc.shape[1]
        g_sum = torch.zeros(d_sae, device=g.device, dtype=torch.float32).index_add_(0, idx.reshape(-1),
                                                                                   g.reshape(-1).float())
        grad_W = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[3]:
            centred = x.to(g.dtype) - b_dec.to(g.dtype)
            if runs_dense(idx.shape[1], d_sae, g.device):   # many entries per row (AuxK): one dense product
                grad_W = (centred.T @ densify(idx, g, d_sae)).to(ctx.w_dtype)
            else:
                grad_W = scatter_rows(idx, g, centred, d_sae).t().contiguous().to(ctx.w_dtype)
        if ctx.needs_input_grad[4]:
            grad_b_enc = g_sum.to(ctx.w_dtype)
        if ctx.needs_input_grad[5]:
            grad_b_dec = -row_dot(W_enc, g_sum).to(ctx.w_dtype)
        return None, None, None, grad_W, grad_b_enc, grad_b_dec, None


def decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]]`` per row (no decoder bias), sparse in both directions."""
    return _Decode.apply(idx, vals, W_dec)


def autograd_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The same sum through ``embedding_bag`` and its own backward (the ``autograd`` path)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum")


def select(pre: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
           b_dec: torch.Tensor, W_lp: torch.Tensor | None = None) -> torch.Tensor:
    """``pre.gather(1, idx)`` where ``pre = (x - b_dec) W_enc + b_enc`` was computed without autograd; the
    gradients reach ``W_enc``, ``b_enc`` and ``b_dec`` through the selected entries only. ``W_lp`` is the
    copy of ``W_enc`` the forward used (``b_dec``'s gradient is a product with it)."""
    return _Select.apply(pre, idx, x, W_enc, b_enc, b_dec, W_enc if W_lp is None else W_lp)
