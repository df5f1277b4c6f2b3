"""ReLU SAE with the Anthropic April-2024 recipe: L1 penalty weighted by decoder row norms.

loss = mse + l1_lambda * mean_t sum_i f_i ||W_dec,i||; decoder rows start at norm 0.1 in random
directions, W_enc = W_dec^T, zero biases, and no unit-norm constraint (the norm-weighted penalty
removes the incentive to shrink f and grow W_dec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.models.base import SAE, ModelConfig, SAEOutput, dense_output


@dataclass
class ReluConfig(ModelConfig):
    name: str = "relu"
    dec_init_norm: float | None = None  # norm of the initial decoder rows; null = 0.1 (April-2024 recipe)


class ReluSAE(SAE):
    architecture = "relu"
    config_class = ReluConfig
    family = "penalty"
    # 3e-3 and 1024 at 400-1000 steps: the grid's best on every ground-truth set (d_in 64-256)
    budget_lr_cap = 3e-3
    budget_min_steps = 800
    sparsity_metric = "l1"
    penalty = "loss adds l1_lambda * mean_t sum_i f_i ||W_dec,i|| (L1 weighted by decoder norms)"
    default_coef = 5.0
    default_dec_init_norm = 0.1
    saelens_architecture = "standard"

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None = None) -> SAE:
        return cls(d_in, hidden, cfg.dec_init_norm or cls.default_dec_init_norm, generator)

    def encode(self, x_BD: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def forward(self, x_BD: Tensor) -> SAEOutput:
        f_BH = self.encode(x_BD)
        x_hat_BD = self.decode(f_BH)
        l1 = (f_BH.float() * self.dec_norms().float()).sum(-1).mean()
        return dense_output(x_BD, x_hat_BD, f_BH, l1, x_BD.new_zeros((), dtype=torch.float32))
