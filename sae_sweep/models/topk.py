"""TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations per token, plus AuxK.

Decoder rows are kept at unit norm (the gradient component parallel to each row is removed before
the step and rows are renormalised after it); W_enc starts as W_dec^T; b_dec (at the data mean,
as for every architecture) is subtracted before encoding. AuxK reconstructs the main residual from
the k_aux most active *dead* latents (silent for `aux_dead_tokens`), so they keep receiving gradient.

Training has two paths with the same loss and gradients (tests hold them to it):
- sparse (default): the dense encoder GEMM and top-k, then everything else touches only the k (and
  k_aux) active latents per token: the decoder is an embedding_bag (gather forward, index-add
  backward) and the encoder's weight gradient is a sparse [H, B] x [B, D] product. About
  2*B*D*H + O(B*k*D) FLOPs per step instead of ~12*B*D*H.
- dense (`model.sparse_kernels=false`): the textbook formulation, kept as the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_sweep.models.base import SAE, SAEOutput, dense_output, mse_per_token


def topk_relu(pre_BH: Tensor, k: int) -> Tensor:
    """Dense [B, H] tensor holding the k largest relu(pre) per row, zeros elsewhere."""
    values, indices = pre_BH.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BH).scatter_(-1, indices, torch.relu(values))


class _SparseTopKEncoder(torch.autograd.Function):
    """(vals [B,k], idx [B,k], aux_vals [B,k_aux], aux_idx [B,k_aux]) of relu(top-k(pre)); the aux pair
    ranks only the latents in `dead_H`. The backward pass touches only the selected latents."""

    @staticmethod
    def forward(
        ctx: Any,
        x_BD: Tensor,
        W_enc_DH: Tensor,
        b_enc_H: Tensor,
        b_dec_D: Tensor,
        k: int,
        dead_H: Tensor | None,
        k_aux: int,
        subtract_b_dec: bool,
    ) -> tuple[Tensor, ...]:
        x_in_BD = x_BD - b_dec_D if subtract_b_dec else x_BD
        pre_BH = torch.addmm(b_enc_H, x_in_BD, W_enc_DH)
        vals_BK, idx_BK = pre_BH.topk(k, dim=-1, sorted=False)
        vals_BK = vals_BK.clamp_min(0)
        if dead_H is None:
            aux_vals, aux_idx = vals_BK.new_zeros(len(x_BD), 0), idx_BK.new_zeros(len(x_BD), 0)
        else:
            aux_vals, aux_idx = pre_BH.masked_fill_(~dead_H, -torch.inf).topk(k_aux, dim=-1, sorted=False)
            aux_vals = aux_vals.clamp_min(0)  # -inf (not dead) becomes 0: no output, no gradient
        ctx.subtract_b_dec = subtract_b_dec
        ctx.save_for_backward(x_in_BD, W_enc_DH, idx_BK, vals_BK > 0, aux_idx, aux_vals > 0)
        ctx.mark_non_differentiable(idx_BK, aux_idx)
        return vals_BK, idx_BK, aux_vals, aux_idx

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor, _g_idx: Any, g_aux: Tensor, _g_aux_idx: Any) -> tuple[Any, ...]:
        x_in_BD, W_enc_DH, idx_BK, active_BK, aux_idx, aux_active = ctx.saved_tensors
        batch, hidden = x_in_BD.shape[0], W_enc_DH.shape[1]
        idx = torch.cat((idx_BK, aux_idx), 1)
        g = torch.cat((g_vals * active_BK, g_aux * aux_active), 1).to(x_in_BD.dtype)
        flat_idx, flat_g = idx.flatten(), g.flatten()
        grad_b_enc = torch.zeros(hidden, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, flat_g)
        rows = torch.arange(batch, device=g.device).repeat_interleave(idx.shape[1])
        g_HB = torch.sparse_coo_tensor(
            torch.stack((flat_idx, rows)), flat_g, (hidden, batch), check_invariants=False
        )
        grad_W_enc = torch.sparse.mm(g_HB, x_in_BD).t()
        # d pre / d b_dec = -W_enc for every token, so the batch sum is -W_enc @ (sum of pre grads).
        grad_b_dec = -(W_enc_DH @ grad_b_enc) if ctx.subtract_b_dec else None
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None


class TopKSAE(SAE):
    architecture = "topk"
    subtract_b_dec_default = True

    def __init__(
        self,
        d_in: int,
        hidden: int,
        k: int,
        aux_k: int | None,
        aux_k_coef: float,
        aux_dead_tokens: int,
        generator: torch.Generator | None,
        sparse_kernels: bool = True,
    ):
        super().__init__(d_in, hidden, dec_init_norm=1.0, generator=generator)
        self.k = k
        self.aux_k = min(aux_k if aux_k is not None else max(d_in // 2, 1), hidden)
        self.aux_k_coef = aux_k_coef
        self.aux_dead_tokens = aux_dead_tokens
        self.sparse_kernels = sparse_kernels
        # Tokens since each latent last fired; a buffer so checkpoints carry it.
        self.register_buffer("tokens_since_fired", torch.zeros(hidden, dtype=torch.long))

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k}

    def encode(self, x_BD: Tensor) -> Tensor:
        return topk_relu(self.pre_acts(x_BD), self.k)

    def select(self, pre_BH: Tensor) -> Tensor:
        """Training-time sparsification (BatchTopK overrides this)."""
        return topk_relu(pre_BH, self.k)

    def _dead(self) -> Tensor:
        return self.tokens_since_fired >= self.aux_dead_tokens

    def _aux_scale(self) -> Tensor:
        # As SAELens: fewer dead latents than k_aux get proportionally less weight. Computed on
        # device whether or not any latent is dead, so the hot loop never syncs on a count.
        return self.aux_k_coef * (self._dead().sum().float() / self.aux_k).clamp(max=1.0)

    def forward(self, x_BD: Tensor) -> SAEOutput:
        if self.sparse_kernels and type(self).select is TopKSAE.select:
            return self._forward_sparse(x_BD)
        pre_BH = self.pre_acts(x_BD)
        f_BH = self.select(pre_BH)
        x_hat_BD = self.decode(f_BH)
        return dense_output(x_BD, x_hat_BD, f_BH, x_BD.new_zeros(()), self.aux_loss(x_BD, x_hat_BD, pre_BH))

    def _forward_sparse(self, x_BD: Tensor) -> SAEOutput:
        dead_H = self._dead() if self.aux_k_coef > 0 else None
        # The AuxK pass costs more than the main one (k_aux = d_in/2 >> k); skip it while nothing is
        # dead. Asking costs a host sync, free on CPU; on CUDA the masked pass runs instead.
        if dead_H is not None and x_BD.device.type == "cpu" and not bool(dead_H.any()):
            dead_H = None
        use_aux = dead_H is not None
        vals_BK, idx_BK, aux_vals, aux_idx = _SparseTopKEncoder.apply(
            x_BD, self.W_enc, self.b_enc, self.b_dec, self.k, dead_H, self.aux_k, self.subtract_b_dec
        )
        # Under bf16 autocast the encoder's values come out bf16; embedding_bag (no autocast rule) needs
        # them in the decoder's dtype, and a gather of k rows per token gains nothing from bf16.
        vals_BK, aux_vals = vals_BK.to(self.W_dec.dtype), aux_vals.to(self.W_dec.dtype)
        x_hat_BD = F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK, mode="sum") + self.b_dec
        aux = x_BD.new_zeros((), dtype=torch.float32)
        if use_aux:
            residual_BD = (x_BD - x_hat_BD).detach()
            residual_hat_BD = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_vals, mode="sum")
            aux = self._aux_scale() * mse_per_token(residual_BD, residual_hat_BD)
        active_BK = vals_BK > 0
        # A count, not a boolean-mask assignment: no host sync on CUDA.
        fires_H = torch.zeros(self.hidden, dtype=torch.int32, device=x_BD.device)
        fired_H = fires_H.index_add_(0, idx_BK.flatten(), active_BK.flatten().int()) > 0
        return SAEOutput(
            x_hat_BD,
            None,
            mse_per_token(x_BD, x_hat_BD),
            x_BD.new_zeros(()),
            aux,
            fired_H=fired_H,
            l0=active_BK.sum(-1).float().mean(),
        )

    def aux_loss(self, x_BD: Tensor, x_hat_BD: Tensor, pre_BH: Tensor) -> Tensor:
        if self.aux_k_coef == 0:
            return x_BD.new_zeros((), dtype=torch.float32)
        masked_pre_BH = torch.where(self._dead(), pre_BH, torch.full_like(pre_BH, -torch.inf))
        f_aux_BH = topk_relu(masked_pre_BH, self.aux_k).nan_to_num(0.0)
        residual_BD = (x_BD - x_hat_BD).detach()
        return self._aux_scale() * mse_per_token(residual_BD, f_aux_BH @ self.W_dec)

    def before_optimizer_step(self) -> None:
        # Remove the gradient component parallel to each (unit) decoder row: it would only change the norm.
        W, g = self.W_dec, self.W_dec.grad
        if g is not None:
            g -= (g * W).sum(-1, keepdim=True) * W

    def after_optimizer_step(self, fired_H: Tensor, n_tokens: int) -> None:
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.tokens_since_fired += n_tokens
            self.tokens_since_fired.masked_fill_(fired_H, 0)
