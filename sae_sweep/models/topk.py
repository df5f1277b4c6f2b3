"""TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations per token, plus AuxK.

Decoder rows are kept at unit norm (the gradient component parallel to each row is removed before
the step and rows are renormalised after it); W_enc starts as W_dec^T; b_dec (at the data mean,
as for every architecture) is subtracted before encoding. AuxK reconstructs the main residual from
the k_aux most active *dead* latents (silent for `aux_dead_tokens`), so they keep receiving gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae_sweep.models.base import SAE, SAEOutput, mse_per_token


def topk_relu(pre_BH: Tensor, k: int) -> Tensor:
    """Dense [B, H] tensor holding the k largest relu(pre) per row, zeros elsewhere."""
    values, indices = pre_BH.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BH).scatter_(-1, indices, torch.relu(values))


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
    ):
        super().__init__(d_in, hidden, dec_init_norm=1.0, generator=generator)
        self.k = k
        self.aux_k = min(aux_k if aux_k is not None else max(d_in // 2, 1), hidden)
        self.aux_k_coef = aux_k_coef
        self.aux_dead_tokens = aux_dead_tokens
        # Tokens since each latent last fired; a buffer so checkpoints carry it.
        self.register_buffer("tokens_since_fired", torch.zeros(hidden, dtype=torch.long))

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k}

    def encode(self, x_BD: Tensor) -> Tensor:
        return topk_relu(self.pre_acts(x_BD), self.k)

    def select(self, pre_BH: Tensor) -> Tensor:
        """Training-time sparsification (BatchTopK overrides this)."""
        return topk_relu(pre_BH, self.k)

    def forward(self, x_BD: Tensor) -> SAEOutput:
        pre_BH = self.pre_acts(x_BD)
        f_BH = self.select(pre_BH)
        x_hat_BD = self.decode(f_BH)
        mse = mse_per_token(x_BD, x_hat_BD)
        zero = x_BD.new_zeros((), dtype=torch.float32)
        return SAEOutput(x_hat_BD, f_BH, mse, zero, self.aux_loss(x_BD, x_hat_BD, pre_BH))

    def aux_loss(self, x_BD: Tensor, x_hat_BD: Tensor, pre_BH: Tensor) -> Tensor:
        dead_H = self.tokens_since_fired >= self.aux_dead_tokens
        if self.aux_k_coef == 0:
            return x_BD.new_zeros((), dtype=torch.float32)
        # Computed whether or not any latent is dead (masked), so the hot loop never syncs on a count.
        n_dead = dead_H.sum()
        masked_pre_BH = torch.where(dead_H, pre_BH, torch.full_like(pre_BH, -torch.inf))
        f_aux_BH = topk_relu(masked_pre_BH, self.aux_k).nan_to_num(0.0)
        residual_BD = (x_BD - x_hat_BD).detach()
        residual_hat_BD = f_aux_BH @ self.W_dec
        aux_mse = (residual_BD - residual_hat_BD).float().pow(2).sum(-1).mean()
        # Scale as SAELens does: fewer dead latents than k_aux get proportionally less weight.
        scale = (n_dead.float() / self.aux_k).clamp(max=1.0)
        return self.aux_k_coef * scale * aux_mse

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
