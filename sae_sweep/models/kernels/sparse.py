"""The sparse training path of the TopK family: dense encoder GEMM and selection, then only the
selected (token, latent) entries.

A selection is a `Code`: N entries in token-major order, token b owning entries bounds[b]:bounds[b+1].
TopK gives every token k entries; BatchTopK gives a variable number (mean k), which is why the layout
is a row pointer rather than a [B, k] block (`bounds[:-1]` are embedding_bag's offsets).

Two interchangeable kernel sets compute the same values and gradients:
- "torch": embedding_bag for the decoder (its backward: per-entry dot products and an index-add into
  W_dec's gradient) and a sparse COO x dense product for the encoder weight gradient.
- "triton": the kernels in triton_ops (gather-sum forward, gather-dot and segmented scatter backward).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Code(NamedTuple):
    vals: Tensor  # [N] relu'd activations (0 = selected but not active: no output, no gradient)
    idx: Tensor  # [N] int64 latent of each entry
    rows: Tensor  # [N] int64 token of each entry (non-decreasing)
    bounds: Tensor  # [B + 1] int64 row pointer


def _fixed_code(vals_BK: Tensor, idx_BK: Tensor) -> Code:
    B, k = idx_BK.shape
    rows = torch.arange(B, device=idx_BK.device).repeat_interleave(k)
    bounds = torch.arange(B + 1, device=idx_BK.device) * k
    return Code(vals_BK.flatten(), idx_BK.flatten(), rows, bounds)


def topk_code(pre_BH: Tensor, k: int) -> Code:
    """Each token's k largest pre-activations, relu'd."""
    vals, idx = pre_BH.topk(k, dim=-1, sorted=False)
    return _fixed_code(vals.clamp_min(0), idx)


def batch_top_values(pre_BH: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """(relu'd values, flat indices into pre_BH) of its n_keep largest entries over the whole batch.

    On CPU, a flat top-n over B*H values costs several times a per-row top-k. So: take each row's top
    2n/B as candidates, then the top n of those. That is exact when no row had all of its candidates
    kept (every other value of such a row is below its smallest candidate, hence below the n-th);
    rows that did are redone with twice as many candidates until none remains. On CUDA (a radix
    select, and no host sync wanted) it is the flat top-n. relu is applied to the n values only (it
    is monotone), not to the B*H pre-activations.
    """
    B, H = pre_BH.shape
    n_keep = min(n_keep, B * H)
    if pre_BH.device.type != "cpu" or n_keep == 0:
        vals, flat = pre_BH.flatten().topk(n_keep, sorted=False)
        return vals.clamp_min(0), flat
    m = min(H, max(1, -(-2 * n_keep // B)))
    cand_v, cand_i = pre_BH.topk(m, dim=-1, sorted=False)
    cand_i = cand_i + torch.arange(B, device=pre_BH.device)[:, None] * H
    all_v, all_i = cand_v.flatten(), cand_i.flatten()
    redo = torch.arange(B, device=pre_BH.device)
    row_min = cand_v.min(-1).values
    while True:
        vals, pos = all_v.topk(n_keep, sorted=False)
        if m >= H:
            break
        nth = vals.min()
        # rows whose every candidate is kept, where something above the n-th may remain unseen
        # (below 0 nothing counts: relu makes every such value 0)
        full = (row_min >= nth) & (row_min > 0)
        if not bool(full.any()):
            break
        rows = redo[full]
        m = min(H, 2 * m)
        # drop those rows' old candidates (they are among the new ones) and take m from each
        all_v = all_v.masked_fill(torch.isin(all_i // H, rows), -torch.inf)
        new_v, new_i = pre_BH[rows].topk(m, dim=-1, sorted=False)
        all_v = torch.cat((all_v, new_v.flatten()))
        all_i = torch.cat((all_i, (new_i + rows[:, None] * H).flatten()))
        redo, row_min = rows, new_v.min(-1).values
    return vals.clamp_min(0), all_i[pos]


def batch_topk_code(pre_BH: Tensor, n_keep: int) -> Code:
    """The batch's n_keep largest relu'd pre-activations, as token-major entries (latents ascending
    within a token)."""
    B, H = pre_BH.shape
    vals, flat = batch_top_values(pre_BH, n_keep)
    flat, order = flat.sort(stable=True)  # keys are unique; on CPU the stable sort is ~3x faster
    rows, idx = flat // H, flat % H
    bounds = torch.zeros(B + 1, dtype=torch.int64, device=pre_BH.device)
    torch.cumsum(torch.bincount(rows, minlength=B), 0, out=bounds[1:])
    return Code(vals[order], idx, rows, bounds)


class _Encoder(torch.autograd.Function):
    """(vals, aux_vals) of the selection and of AuxK's pick among dead latents, with the integer parts
    of both codes returned alongside. The backward pass touches only the selected entries."""

    @staticmethod
    def forward(
        ctx: Any,
        x_BD: Tensor,
        W_enc_DH: Tensor,
        b_enc_H: Tensor,
        b_dec_D: Tensor,
        select: Any,
        dead_H: Tensor | None,
        k_aux: int,
        subtract_b_dec: bool,
        kernels: str,
    ) -> tuple[Tensor, ...]:
        x_in_BD = x_BD - b_dec_D if subtract_b_dec else x_BD
        pre_BH = torch.addmm(b_enc_H, x_in_BD, W_enc_DH)
        code: Code = select(pre_BH)
        if dead_H is None:
            aux = _fixed_code(code.vals.new_zeros(len(x_BD), 0), code.idx.new_zeros(len(x_BD), 0))
        else:
            aux_v, aux_i = pre_BH.masked_fill_(~dead_H, -torch.inf).topk(k_aux, dim=-1, sorted=False)
            aux = _fixed_code(aux_v.clamp_min(0), aux_i)  # -inf (not dead) becomes 0: no output, no grad
        ctx.subtract_b_dec, ctx.kernels = subtract_b_dec, kernels
        ctx.save_for_backward(
            x_in_BD, W_enc_DH, code.idx, code.rows, code.vals > 0, aux.idx, aux.rows, aux.vals > 0
        )
        ints = (code.idx, code.rows, code.bounds, aux.idx, aux.rows, aux.bounds)
        ctx.mark_non_differentiable(*ints)
        return (code.vals, aux.vals, *ints)

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor, g_aux: Tensor, *_ints: Any) -> tuple[Any, ...]:  # pyright: ignore[reportIncompatibleMethodOverride]
        x_in_BD, W_enc_DH, idx, rows, active, aux_idx, aux_rows, aux_active = ctx.saved_tensors
        batch, hidden = x_in_BD.shape[0], W_enc_DH.shape[1]
        idx, rows = torch.cat((idx, aux_idx)), torch.cat((rows, aux_rows))
        g = torch.cat((g_vals * active, g_aux * aux_active)).to(x_in_BD.dtype)
        grad_b_enc = torch.zeros(hidden, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        if ctx.kernels == "triton":
            from sae_sweep.models.kernels import triton_ops

            grad_W_enc = triton_ops.segment_scatter(idx, rows, g, x_in_BD, hidden).t()
        else:
            g_HB = torch.sparse_coo_tensor(
                torch.stack((idx, rows)), g, (hidden, batch), check_invariants=False
            )
            grad_W_enc = torch.sparse.mm(g_HB, x_in_BD).t()
        # d pre / d b_dec = -W_enc for every token, so the batch sum is -W_enc @ (sum of pre grads).
        grad_b_dec = -(W_enc_DH @ grad_b_enc) if ctx.subtract_b_dec else None
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None, None


def sparse_encode(
    x_BD: Tensor,
    W_enc_DH: Tensor,
    b_enc_H: Tensor,
    b_dec_D: Tensor,
    select: Any,
    dead_H: Tensor | None,
    k_aux: int,
    subtract_b_dec: bool,
    kernels: str,
) -> tuple[Code, Code]:
    """(code, aux code): `select(pre_BH) -> Code` picks the entries (topk_code, batch_topk_code with
    its budget bound); AuxK's code holds each token's k_aux largest pre-activations among `dead_H`
    (no entries when dead_H is None). Gradients flow to W_enc, b_enc and b_dec through the values."""
    vals, aux_vals, idx, rows, bounds, aux_idx, aux_rows, aux_bounds = _Encoder.apply(
        x_BD, W_enc_DH, b_enc_H, b_dec_D, select, dead_H, k_aux, subtract_b_dec, kernels
    )
    return Code(vals, idx, rows, bounds), Code(aux_vals, aux_idx, aux_rows, aux_bounds)


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vals: Tensor, W_HD: Tensor, idx: Tensor, rows: Tensor, bounds: Tensor) -> Tensor:
        from sae_sweep.models.kernels import triton_ops

        ctx.save_for_backward(vals, W_HD, idx, rows)
        return triton_ops.gather_sum(idx, vals, bounds, W_HD)

    @staticmethod
    def backward(ctx: Any, g_BD: Tensor) -> tuple[Any, ...]:  # pyright: ignore[reportIncompatibleMethodOverride]
        from sae_sweep.models.kernels import triton_ops

        vals, W_HD, idx, rows = ctx.saved_tensors
        g_BD = g_BD.to(W_HD.dtype)
        grad_vals = (
            triton_ops.gather_dot(idx, rows, g_BD, W_HD).to(vals.dtype) if ctx.needs_input_grad[0] else None
        )
        grad_W = (
            triton_ops.segment_scatter(idx, rows, vals, g_BD, W_HD.shape[0])
            if ctx.needs_input_grad[1]
            else None
        )
        return grad_vals, grad_W, None, None, None


def sparse_decode(code: Code, W_dec_HD: Tensor, kernels: str) -> Tensor:
    """[B, D]: each token's entries' values times their decoder rows, summed (no bias)."""
    # Under bf16 autocast the encoder's values come out bf16; embedding_bag (no autocast rule) needs
    # them in the decoder's dtype, and a gather of k rows per token gains nothing from bf16.
    vals = code.vals.to(W_dec_HD.dtype)
    if kernels == "triton":
        return _TritonDecode.apply(vals, W_dec_HD, code.idx, code.rows, code.bounds)
    return F.embedding_bag(code.idx, W_dec_HD, code.bounds[:-1], mode="sum", per_sample_weights=vals)


def sparse_decode_prefixes(code: Code, W_dec_HD: Tensor, widths: list[int], kernels: str) -> Tensor:
    """[G, B, D]: for each nested prefix of widths m_1 < ... < m_G (latents 0..m_g), the reconstruction
    (no bias) from the entries in it. One decode: each token's entries are split into G bags by the
    group of their latent, the bags decoded at once, and the groups summed cumulatively."""
    B, G = code.bounds.numel() - 1, len(widths)
    group = torch.bucketize(code.idx, torch.tensor(widths, device=code.idx.device), right=True)
    bag = code.rows * G + group
    bag, order = bag.sort(stable=True)  # token-major already; grouped within each token now
    bounds = torch.zeros(B * G + 1, dtype=torch.int64, device=bag.device)
    torch.cumsum(torch.bincount(bag, minlength=B * G), 0, out=bounds[1:])
    groups_BGD = sparse_decode(Code(code.vals[order], code.idx[order], bag, bounds), W_dec_HD, kernels)
    return groups_BGD.view(B, G, -1).cumsum(1).transpose(0, 1)


def fired(code: Code, hidden: int) -> Tensor:
    """bool [H]: latents active in at least one entry. A count, not a boolean-mask assignment: no host
    sync on CUDA."""
    fires_H = torch.zeros(hidden, dtype=torch.int32, device=code.idx.device)
    return fires_H.index_add_(0, code.idx, (code.vals > 0).int()) > 0
