"""Triton kernels for :func:`sc_steer.sae.sparse.scatter_rows`, :func:`sc_steer.sae.sparse.gather_dot` and
:func:`sc_steer.sae.sparse.row_dot` (CUDA builds of PyTorch ship Triton).

The ``B * k`` entries of a TopK code are sorted by latent, so each latent's entries form one segment.
One program owns one latent and one block of columns: it sums ``coef[e] * dense[row[e]]`` over the
segment, a block of entries at a time, in fp32 registers and writes its output row block once. Every
output element is written (zeros for latents that did not fire), so the output needs no zero-fill and
no atomics; a latent firing on every token costs ``B / BLOCK_E`` iterations of one program.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - CPU builds have no Triton
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_D": bd, "BLOCK_E": be}, num_warps=w)
               for bd, be, w in ((256, 16, 4), (512, 16, 4), (512, 32, 8), (1024, 8, 8), (128, 32, 4))]

    @triton.jit
    def segment_sum(starts, rows, coef, dense, out, d, stride_dense, stride_out, n_out_bucket,
                    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
        latent = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        start = tl.load(starts + latent)
        end = tl.load(starts + latent + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            e_ok = e < end
            r = tl.load(rows + e, mask=e_ok, other=0).to(tl.int64)
            c = tl.load(coef + e, mask=e_ok, other=0.0).to(tl.float32)
            block = tl.load(dense + r[:, None] * stride_dense + cols[None, :], mask=e_ok[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32)
            acc += tl.sum(block * c[:, None], axis=0)
        tl.store(out + latent.to(tl.int64) * stride_out + cols, acc, mask=col_ok)

    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter (tests): one fixed config
        return _FixedConfig(segment_sum, BLOCK_D=128, BLOCK_E=16)
    return triton.autotune(configs=configs, key=["d", "n_out_bucket"])(segment_sum)


class _FixedConfig:
    """``kernel[grid](...)`` with fixed meta-parameters, for the interpreter (which cannot autotune)."""

    def __init__(self, kernel, **meta):
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        g = grid(self.meta) if callable(grid) else grid
        return functools.partial(self.kernel[g], **self.meta)


def scatter_rows(idx: torch.Tensor, coef: torch.Tensor, dense: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[idx[b, j]] += coef[b, j] * dense[b]`` as ``[n_out, d]`` fp32 (see the module docstring)."""
    import triton

    k = idx.shape[1]
    sorted_latents, order = torch.sort(idx.reshape(-1))
    bounds = torch.arange(n_out + 1, device=idx.device, dtype=sorted_latents.dtype)
    starts = torch.searchsorted(sorted_latents, bounds)  # segment of latent j: [starts[j], starts[j+1])
    rows = torch.div(order, k, rounding_mode="floor")
    coef_sorted = coef.reshape(-1)[order].contiguous()
    dense = dense.contiguous()
    d = dense.shape[1]
    out = torch.empty(n_out, d, device=dense.device, dtype=torch.float32)
    grid = lambda meta: (n_out, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _kernel()[grid](starts, rows, coef_sorted, dense, out, d, dense.stride(0), out.stride(0),
                    1 << max(0, n_out - 1).bit_length())
    return out


@functools.cache
def _row_dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_dot(W, v, out, n_rows, n_cols, stride_w, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < n_cols
            w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(v + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out + rows, acc, mask=row_ok)

    return row_dot


def row_dot(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W @ v`` as fp32 for a wide ``W [rows, cols]`` (any float dtype): one pass over W, a few rows per
    program, fp32 accumulation. cuBLAS's bf16 matrix-vector kernel read a 4096 x 65536 W at ~80 GB/s."""
    import triton

    W = W.contiguous()
    out = torch.empty(W.shape[0], device=W.device, dtype=torch.float32)
    block_r = 4
    _row_dot_kernel()[(triton.cdiv(W.shape[0], block_r),)](W, v.contiguous(), out, W.shape[0], W.shape[1], W.stride(0),
                                                         BLOCK_R=block_r, BLOCK_C=1024, num_warps=4)
    return out


@functools.cache
def _gather_dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_dot(idx, W, g, out, k, d, stride_idx, stride_w, stride_g, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        j_ok = j < k
        rows = tl.load(idx + b.to(tl.int64) * stride_idx + j, mask=j_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            gv = tl.load(g + b.to(tl.int64) * stride_g + cols, mask=c_ok, other=0.0).to(tl.float32)
            w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=j_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * gv[None, :], axis=1)
        tl.store(out + b.to(tl.int64) * k + j, acc, mask=j_ok)

    return gather_dot


def gather_dot(idx: torch.Tensor, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = <g_b, W[idx[b, j]]>`` in fp32, reading each selected row of W once from memory and
    never writing the ``[B, k, d]`` gathered rows that a PyTorch gather + bmm would."""
    import triton

    idx, W, g = idx.contiguous(), W.contiguous(), g.contiguous()
    B, k = idx.shape
    out = torch.empty(B, k, device=W.device, dtype=torch.float32)
    block_k = 16
    _gather_dot_kernel()[(B, triton.cdiv(k, block_k))](idx, W, g, out, k, W.shape[1], idx.stride(0), W.stride(0),
                                                     g.stride(0), BLOCK_K=block_k, BLOCK_D=512, num_warps=4)
    return out
