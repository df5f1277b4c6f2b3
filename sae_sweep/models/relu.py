"""ReLU SAE with the Anthropic April-2024 recipe: L1 penalty weighted by decoder row norms.

loss = mse + l1_lambda * mean_t sum_i f_i ||W_dec,i||; decoder rows start at norm 0.1 in random
directions, W_enc = W_dec^T, zero biases, and no unit-norm constraint (the norm-weighted penalty
removes the incentive to shrink f and grow W_dec).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_sweep.models.base import SAE, SAEOutput, dense_output


class ReluSAE(SAE):
    architecture = "relu"

    def encode(self, x_BD: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def forward(self, x_BD: Tensor) -> SAEOutput:
        f_BH = self.encode(x_BD)
        x_hat_BD = self.decode(f_BH)
        l1 = (f_BH.float() * self.dec_norms().float()).sum(-1).mean()
        return dense_output(x_BD, x_hat_BD, f_BH, l1, x_BD.new_zeros((), dtype=torch.float32))
