"""JumpReLU SAE (Rajamanoharan et al. 2024): a learned per-latent threshold and an L0 penalty.

f_i = pre_i if pre_i > theta_i else 0;  loss = mse + l1_lambda * mean_t #{i : pre_i > theta_i}.
The step function has no useful gradient, so theta learns through straight-through estimators with
a rectangle kernel of width `jump_bandwidth` (in normalised activation units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_sweep.checks import positive
from sae_sweep.models.base import SAE, ModelConfig, SAEOutput, dense_output


@dataclass
class JumpReLUConfig(ModelConfig):
    name: str = "jumprelu"
    # norm of the initial decoder rows; null = 1 (pre-activations must start near the threshold for the
    # estimator to see them)
    dec_init_norm: float | None = None
    jump_bandwidth: float = 0.5  # straight-through estimator bandwidth (normalised units)
    jump_threshold_init: float = 0.5  # initial threshold of every latent (normalised units)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold)
        # d/dtheta of pre * H(pre - theta) ~ -(theta / eps) K((pre - theta) / eps)
        grad_threshold = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad_out).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        # d/dtheta H(pre - theta) ~ -(1 / eps) K((pre - theta) / eps); no gradient to pre (as in the paper)
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad_out).sum(0)
        return None, grad_threshold, None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    config_class = JumpReLUConfig
    family = "penalty"
    sparsity_metric = "l0"
    penalty = "loss adds l1_lambda * mean_t #{i : pre_i > theta_i} (L0, straight-through estimators)"
    default_coef = 1.0
    default_dec_init_norm = 1.0
    saelens_architecture = "jumprelu"

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None = None) -> SAE:
        dec_init_norm = cfg.dec_init_norm or cls.default_dec_init_norm
        return cls(d_in, hidden, dec_init_norm, cfg.jump_bandwidth, cfg.jump_threshold_init, generator)

    @classmethod
    def check_config(cls, cfg: Any, l1_lambda: float | None, hidden_dim: int | None) -> None:
        super().check_config(cfg, l1_lambda, hidden_dim)
        positive("model.jump_bandwidth", cfg.jump_bandwidth)
        positive("model.jump_threshold_init", cfg.jump_threshold_init)

    def __init__(
        self,
        d_in: int,
        hidden: int,
        dec_init_norm: float,
        bandwidth: float,
        threshold_init: float,
        generator: torch.Generator | None,
    ):
        super().__init__(d_in, hidden, dec_init_norm, generator)
        self.bandwidth = bandwidth
        # log-parametrised so the threshold stays positive
        self.log_threshold = nn.Parameter(torch.full((hidden,), math.log(threshold_init)))

    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BH = self.pre_acts(x_BD)
        return pre_BH * (pre_BH > self.threshold())

    def forward(self, x_BD: Tensor) -> SAEOutput:
        pre_BH = self.pre_acts(x_BD)
        threshold_H = self.threshold().to(pre_BH.dtype)
        f_BH = _JumpReLU.apply(pre_BH, threshold_H, self.bandwidth)
        x_hat_BD = self.decode(f_BH)
        l0 = _Step.apply(pre_BH, threshold_H, self.bandwidth).float().sum(-1).mean()
        zero = x_BD.new_zeros((), dtype=torch.float32)
        return dense_output(x_BD, x_hat_BD, f_BH, l0, zero)

    def inference_threshold(self) -> Tensor:
        return self.threshold()

    def set_inference_threshold(self, threshold_H: Tensor) -> None:
        self.log_threshold.copy_(threshold_H.clamp_min(1e-12).log())
