"""Triton kernel for :func:`sc_steer.sae.sparse.scatter_rows` (CUDA builds of PyTorch ship Triton).

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
