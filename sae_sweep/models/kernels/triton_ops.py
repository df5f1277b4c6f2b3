"""Triton kernels of the sparse TopK path: the same three primitives as the torch path, written out.

Entries are a token-major list of (row, latent, value): token b owns entries bounds[b]:bounds[b+1]
(a CSR row pointer; `bounds[:-1]` are embedding_bag's offsets). N entries, B tokens, D = d_in,
H = hidden latents.

- gather_sum:      out[b] = sum_{j in row b} vals[j] * W[idx[j]]         (decoder forward, AuxK)
- gather_dot:      out[j] = <G[rows[j]], W[idx[j]]>                       (gradient of the k values)
- segment_scatter: out[h] = sum_{j : idx[j] = h} w[j] * src[rows[j]]      (W_dec and W_enc gradients)

gather_sum and segment_scatter are one kernel, a segment sum: each program owns one row of `out` and
sums its segment of entries in registers, storing once. For gather_sum the segments are the tokens'
own; segment_scatter is the transposed product: instead of one atomic add per entry into out[idx[j]]
(thousands of tokens hit the same popular latent), the entries are sorted by latent once and each
latent's segment summed the same way: no atomics, and no zero-fill of `out` (an empty segment stores
zeros). Its programs are launched busiest latent first, so the longest segments do not trail.

Accumulation is fp32 whatever the storage dtype. Under TRITON_INTERPRET=1 the kernels run on CPU
tensors (slowly), which is how the tests check them against the torch path.

The kernels are built on first use and per mode, not at import: Triton decides at decoration time
whether a kernel is interpreted, and tests switch TRITON_INTERPRET on before their first call.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from sae_sweep.models.kernels.choice import interpreting

MAX_BLOCK_D = 128  # columns of D per program: 128 fp32 = one 512-byte row segment
BLOCK_N = 64  # entries per program in gather_dot


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    # `interpret` is the cache key: kernels built under one mode are not reused under the other. The
    # kernels refer to `tl` as a module global: the interpreter patches globals, not closure cells.
    del interpret

    @triton.jit
    def segment_sum_kernel(out_ptr, order_ptr, seg_ptr, sel_ptr, w_ptr, src_ptr, D, BLOCK_D: tl.constexpr):
        # out[o] = sum over j in seg[o]:seg[o+1] of w[j] * src[sel[j]], for o = order[program]
        o = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        start = tl.load(seg_ptr + o)
        end = tl.load(seg_ptr + o + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(start, end):
            r = tl.load(sel_ptr + j).to(tl.int64)
            v = tl.load(w_ptr + j).to(tl.float32)
            s = tl.load(src_ptr + r * D + cols, mask=mask, other=0.0).to(tl.float32)
            acc += v * s
        tl.store(out_ptr + o * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def gather_dot_kernel(
        out_ptr, idx_ptr, rows_ptr, g_ptr, w_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        ents = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        emask = ents < N
        latent = tl.load(idx_ptr + ents, mask=emask, other=0).to(tl.int64)
        row = tl.load(rows_ptr + ents, mask=emask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = emask[:, None] & (cols[None, :] < D)
            g = tl.load(g_ptr + row[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + latent[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(g * w, axis=1)
        tl.store(out_ptr + ents, acc, mask=emask)

    return SimpleNamespace(
        cdiv=triton.cdiv,
        next_power_of_2=triton.next_power_of_2,
        segment_sum=segment_sum_kernel,
        gather_dot=gather_dot_kernel,
    )


def _k() -> Any:
    return _kernels(interpreting())


def _block_d(D: int, block_d: int | None) -> int:
    return block_d if block_d is not None else min(MAX_BLOCK_D, _k().next_power_of_2(D))


def _segment_sum(
    n_out: int, order: Tensor, seg: Tensor, sel: Tensor, w: Tensor, src: Tensor, block_d: int | None
) -> Tensor:
    """[n_out, D] with out[o] = sum over j in seg[o]:seg[o+1] of w[j] * src[sel[j]]; rows in `order`."""
    k = _k()
    D = src.shape[1]
    out = torch.empty(n_out, D, dtype=src.dtype, device=src.device)
    bd = _block_d(D, block_d)
    if n_out > 0:
        k.segment_sum[(n_out, k.cdiv(D, bd))](
            out, order, seg.contiguous(), sel.contiguous(), w.contiguous(), src.contiguous(), D, BLOCK_D=bd
        )
    return out


def gather_sum(idx: Tensor, vals: Tensor, bounds: Tensor, W: Tensor, block_d: int | None = None) -> Tensor:
    """[B, D] with out[b] = sum over token b's entries of vals[j] * W[idx[j]]; dtype of W."""
    B = bounds.numel() - 1
    order = torch.arange(B, device=W.device)
    return _segment_sum(B, order, bounds, idx, vals, W, block_d)


def gather_dot(idx: Tensor, rows: Tensor, G: Tensor, W: Tensor, block_d: int | None = None) -> Tensor:
    """[N] fp32 with out[j] = <G[rows[j]], W[idx[j]]>."""
    k = _k()
    N, D = idx.numel(), W.shape[1]
    out = torch.empty(N, dtype=torch.float32, device=W.device)
    if N > 0:
        k.gather_dot[(k.cdiv(N, BLOCK_N),)](
            out,
            idx.contiguous(),
            rows.contiguous(),
            G.contiguous(),
            W.contiguous(),
            N,
            D,
            BLOCK_N=BLOCK_N,
            BLOCK_D=_block_d(D, block_d),
        )
    return out


def segment_scatter(
    idx: Tensor, rows: Tensor, w: Tensor, src: Tensor, hidden: int, block_d: int | None = None
) -> Tensor:
    """[hidden, D] with out[h] = sum over entries j with idx[j] = h of w[j] * src[rows[j]]."""
    latent, perm = idx.sort(stable=True)  # entries grouped by latent
    counts = torch.bincount(latent, minlength=hidden)
    seg = torch.zeros(hidden + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=seg[1:])
    order = counts.argsort(descending=True)  # busiest latents first
    return _segment_sum(hidden, order, seg, rows[perm], w[perm], src, block_d)
