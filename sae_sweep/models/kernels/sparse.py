"""The sparse training path of the TopK family: dense encoder GEMM and selection, then only the
selected (token, latent) entries.

A selection is a `Code`: N entries in token-major order, token b owning entries bounds[b]:bounds[b+1].
TopK gives every token k entries; BatchTopK gives a variable number (mean k), which is why the layout
is a row pointer rather than a [B, k] block (`bounds[:-1]` are embedding_bag's offsets).

Two interchangeable kernel sets compute the same values and gradients:
- "torch": embedding_bag for the decoder and its per-entry dot products; W_dec's and W_enc's gradients
  are one embedding_bag each over the entries sorted by latent (`transposed_product`: a CSR x dense
  product).
- "triton": the kernels in triton_ops (gather-sum forward, gather-dot and segmented scatter backward).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
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

    On CPU, a flat top-n over B*H values costs several times a per-row top-k. So first a threshold
    sampled from the batch (`_above_sampled_threshold`: one compare over the batch, exact when enough
    values pass it); failing that, take each row's top 2n/B as candidates and t, the n-th largest of
    them. t is at most the true n-th value (the candidates
    are a subset), so a value not among its row's candidates can belong only to a row whose every
    candidate is >= t (a "full" row; any other row's unseen values lie below its smallest candidate,
    hence below t). Those rows contribute all their values >= t instead of their candidates, and the
    top n of that pool is exact: one fix-up, whatever the data (a token of large norm can hold far more
    than 2n/B of the batch's top n). On CUDA (a radix select, and no host sync wanted) it is the flat
    top-n. relu is applied to the n values only (it is monotone), not to the B*H pre-activations; so
    below 0 nothing counts (every such value becomes 0), and a full row adds only its positive values.
    """
    B, H = pre_BH.shape
    n_keep = min(n_keep, B * H)
    if pre_BH.device.type != "cpu" or n_keep == 0:
        vals, flat = pre_BH.flatten().topk(n_keep, sorted=False)
        return vals.clamp_min(0), flat
    found = _above_sampled_threshold(pre_BH, n_keep)
    if found is not None:
        return found
    m = min(H, max(1, -(-2 * n_keep // B)))
    cand_v, cand_i = pre_BH.topk(m, dim=-1, sorted=False)
    cand_i = cand_i + torch.arange(B, device=pre_BH.device)[:, None] * H
    vals, pos = cand_v.flatten().topk(n_keep, sorted=False)
    if m == H:
        return vals.clamp_min(0), cand_i.flatten()[pos]
    nth = vals.min()
    row_min = cand_v.min(-1).values
    full_B = (row_min >= nth) & (row_min > 0)
    if not bool(full_B.any()):
        return vals.clamp_min(0), cand_i.flatten()[pos]
    rows = full_B.nonzero().squeeze(1)
    full_BH = pre_BH[rows]
    r, c = (full_BH >= nth if float(nth) > 0 else full_BH > 0).nonzero(as_tuple=True)
    pool_v = torch.cat((cand_v[~full_B].flatten(), full_BH[r, c]))
    pool_i = torch.cat((cand_i[~full_B].flatten(), rows[r] * H + c))
    vals, pos = pool_v.topk(n_keep, sorted=False)
    return vals.clamp_min(0), pool_i[pos]


# _above_sampled_threshold looks at every 17th pre-activation: coprime with the usual power-of-two widths,
# so the sample walks across the latents from token to token instead of seeing the same columns
SAMPLE_STRIDE = 17


def _above_sampled_threshold(pre_BH: Tensor, n_keep: int) -> tuple[Tensor, Tensor] | None:
    """batch_top_values' first try: a threshold t from every SAMPLE_STRIDE-th value (the value ranked
    ~1.125 n_keep / SAMPLE_STRIDE there), then the top n_keep of the values >= t. Exact whenever at
    least n_keep values are >= t (t is then at most the true n-th value, so all of the top n are
    among them); None otherwise, or when t <= 0 (relu'd values are tied at 0 there). One compare over
    the batch instead of a per-row top-2n/B: tokens of large norm hold many of the batch's top n, and
    their rows would all need the fix-up."""
    flat_N = pre_BH.reshape(-1)  # a view when contiguous, as the pre-activation buffer is
    sample = flat_N[::SAMPLE_STRIDE]
    rank = -(-n_keep * 9 // (8 * SAMPLE_STRIDE))
    if rank >= sample.numel() or n_keep < 8 * SAMPLE_STRIDE:
        return None
    t = sample.topk(rank, sorted=False).values.min()
    if float(t) <= 0:
        return None
    flat = (flat_N >= t).nonzero().squeeze(1)
    if flat.numel() < n_keep:
        return None
    vals, pos = flat_N[flat].topk(n_keep, sorted=False)
    return vals.clamp_min(0), flat[pos]


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


@dataclass(frozen=True)
class Selection:
    """How sparse_encode picks its entries: `select(pre_BH) -> Code` (topk_code, or batch_topk_code with
    its budget bound); AuxK's k_aux largest pre-activations per token among `dead_H` (None: no AuxK
    entries); whether b_dec is subtracted before encoding; which kernels run the backward pass."""

    select: Callable[[Tensor], Code]
    dead_H: Tensor | None
    k_aux: int
    subtract_b_dec: bool
    kernels: str


_orders = threading.local()  # per thread: the last (idx, crow, perm) of _latent_order


def _latent_order(idx: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    """(row pointer over latents, the entries' permutation into latent order) of a stable sort of idx.

    The W_dec and W_enc gradients sort the same entries (without AuxK's) one after the other, so the
    last sort is kept, with a reference to its idx: while that reference lives no other tensor can
    occupy its memory, so equal data pointer, shape and version mean the same entries."""
    last = getattr(_orders, "last", None)
    if last is not None:
        seen, crow, perm = last
        same_entries = seen.data_ptr() == idx.data_ptr() and seen.shape == idx.shape
        if same_entries and seen._version == idx._version and crow.numel() == hidden + 1:
            return crow, perm
    latent, perm = idx.sort(stable=True)
    crow = torch.zeros(hidden + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(latent, minlength=hidden), 0, out=crow[1:])
    _orders.last = (idx, crow, perm)
    return crow, perm


def transposed_product(
    idx: Tensor, rows: Tensor, w: Tensor, src: Tensor, hidden: int, kernels: str
) -> Tensor:
    """[hidden, D] with out[h] = sum over entries j with idx[j] = h of w[j] * src[rows[j]]: S^T @ src for
    the sparse [B, hidden] matrix S of the entries (the W_dec and W_enc gradients).

    torch: the entries sorted by latent (a stable sort keeps tokens ascending within each) make each
    latent one bag of `src` rows, which embedding_bag's forward sums with the weights: the CSR x dense
    product S^T @ src (the same sums, to the last bit or so) in half its time on CPU (that product
    zero-fills its output and copies it twice), and ~10x faster than embedding_bag's own backward,
    which sorts far more slowly."""
    w = w.to(src.dtype)
    if kernels == "triton":
        from sae_sweep.models.kernels import triton_ops

        return triton_ops.segment_scatter(idx, rows, w, src, hidden)
    crow, perm = _latent_order(idx, hidden)
    return F.embedding_bag(rows[perm], src, crow[:-1], mode="sum", per_sample_weights=w[perm])


_scratch = threading.local()  # per thread: {(B, H, dtype): [B, H] pre-activation buffer}


def _pre_activations(b_enc_H: Tensor, x_in_BD: Tensor, W_enc_DH: Tensor) -> Tensor:
    """x_in @ W_enc + b_enc. On CPU into a buffer reused step after step: a fresh [B, H] tensor (64 MB
    at batch 4096, hidden 4096) comes from the system zeroed page by page, which cost ~15% of the GEMM
    here. Safe because nothing keeps the pre-activations past the forward pass (selections copy out
    what they keep). Not under autocast (its casts do not apply to `out=`) nor on CUDA (its caching
    allocator already reuses memory)."""
    device = x_in_BD.device.type
    if device != "cpu" or torch.is_autocast_enabled(device):
        return torch.addmm(b_enc_H, x_in_BD, W_enc_DH)
    key = (x_in_BD.shape[0], W_enc_DH.shape[1], torch.result_type(x_in_BD, W_enc_DH))
    buffers: dict[tuple[int, int, torch.dtype], Tensor] = _scratch.__dict__.setdefault("pre", {})
    if key not in buffers:
        buffers[key] = torch.empty(key[:2], dtype=key[2])
    return torch.addmm(b_enc_H, x_in_BD, W_enc_DH, out=buffers[key])


class _Encoder(torch.autograd.Function):
    """(vals, aux_vals) of the selection and of AuxK's pick among dead latents, with the integer parts
    of both codes returned alongside. The backward pass touches only the selected entries."""

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, W_enc_DH: Tensor, b_enc_H: Tensor, b_dec_D: Tensor, how: Selection
    ) -> tuple[Tensor, ...]:
        x_in_BD = x_BD - b_dec_D if how.subtract_b_dec else x_BD
        pre_BH = _pre_activations(b_enc_H, x_in_BD, W_enc_DH)
        code: Code = how.select(pre_BH)
        if how.dead_H is None:
            aux = _fixed_code(code.vals.new_zeros(len(x_BD), 0), code.idx.new_zeros(len(x_BD), 0))
        else:
            masked_BH = pre_BH.masked_fill_(~how.dead_H, -torch.inf)
            aux_v, aux_i = masked_BH.topk(how.k_aux, dim=-1, sorted=False)
            aux = _fixed_code(aux_v.clamp_min(0), aux_i)  # -inf (not dead) becomes 0: no output, no grad
        ctx.how = how
        ctx.save_for_backward(
            x_in_BD, W_enc_DH, code.idx, code.rows, code.vals > 0, aux.idx, aux.rows, aux.vals > 0
        )
        ints = (code.idx, code.rows, code.bounds, aux.idx, aux.rows, aux.bounds)
        ctx.mark_non_differentiable(*ints)
        return (code.vals, aux.vals, *ints)

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor, g_aux: Tensor, *_ints: Any) -> tuple[Any, ...]:  # pyright: ignore[reportIncompatibleMethodOverride]
        x_in_BD, W_enc_DH, idx, rows, active, aux_idx, aux_rows, aux_active = ctx.saved_tensors
        how: Selection = ctx.how
        hidden = W_enc_DH.shape[1]
        g = (g_vals * active).to(x_in_BD.dtype)
        if aux_idx.numel() > 0:  # AuxK's entries get their gradient through the same pre-activations
            idx, rows = torch.cat((idx, aux_idx)), torch.cat((rows, aux_rows))
            g = torch.cat((g, (g_aux * aux_active).to(g.dtype)))
        grad_b_enc = torch.zeros(hidden, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        # [H, D] transposed is W_enc's own layout (it starts as W_dec^T): no copy into the parameter
        grad_W_enc = transposed_product(idx, rows, g, x_in_BD, hidden, how.kernels).t()
        # d pre / d b_dec = -W_enc for every token, so the batch sum is -W_enc @ (sum of pre grads).
        grad_b_dec = -(W_enc_DH @ grad_b_enc) if how.subtract_b_dec else None
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None


def sparse_encode(
    x_BD: Tensor, W_enc_DH: Tensor, b_enc_H: Tensor, b_dec_D: Tensor, how: Selection
) -> tuple[Code, Code]:
    """(code, aux code) of the dense encoder pre-activations, chosen as `how` says. Gradients flow to
    W_enc, b_enc and b_dec through the codes' values."""
    vals, aux_vals, idx, rows, bounds, aux_idx, aux_rows, aux_bounds = _Encoder.apply(
        x_BD, W_enc_DH, b_enc_H, b_dec_D, how
    )
    return Code(vals, idx, rows, bounds), Code(aux_vals, aux_idx, aux_rows, aux_bounds)


class _Decode(torch.autograd.Function):
    """The gather-sum decoder; its backward computes the values' gradients (per-entry dot products) and
    W_dec's (transposed_product) for both kernel sets."""

    @staticmethod
    def forward(
        ctx: Any, vals: Tensor, W_HD: Tensor, idx: Tensor, rows: Tensor, bounds: Tensor, kernels: str
    ) -> Tensor:
        ctx.kernels = kernels
        ctx.save_for_backward(vals, W_HD, idx, rows, bounds)
        if kernels == "triton":
            from sae_sweep.models.kernels import triton_ops

            return triton_ops.gather_sum(idx, vals, bounds, W_HD)
        return F.embedding_bag(idx, W_HD, bounds[:-1], mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx: Any, g_BD: Tensor) -> tuple[Any, ...]:  # pyright: ignore[reportIncompatibleMethodOverride]
        vals, W_HD, idx, rows, bounds = ctx.saved_tensors
        g_BD = g_BD.to(W_HD.dtype).contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            if ctx.kernels == "triton":
                from sae_sweep.models.kernels import triton_ops

                grad_vals = triton_ops.gather_dot(idx, rows, g_BD, W_HD)
            else:  # embedding_bag's own per-entry dot products (mode 0 = sum; offset2bag = rows)
                grad_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    g_BD, W_HD, idx, bounds[:-1], rows, 0
                )
            grad_vals = grad_vals.to(vals.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = transposed_product(idx, rows, vals, g_BD, W_HD.shape[0], ctx.kernels)
        return grad_vals, grad_W, None, None, None, None


def sparse_decode(code: Code, W_dec_HD: Tensor, kernels: str) -> Tensor:
    """[B, D]: each token's entries' values times their decoder rows, summed (no bias)."""
    # Under bf16 autocast the encoder's values come out bf16; embedding_bag (no autocast rule) needs
    # them in the decoder's dtype, and a gather of k rows per token gains nothing from bf16.
    vals = code.vals.to(W_dec_HD.dtype)
    return _Decode.apply(vals, W_dec_HD, code.idx, code.rows, code.bounds, kernels)


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
