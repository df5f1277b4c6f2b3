"""TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations per token, plus AuxK.

Decoder rows are kept at unit norm (the gradient component parallel to each row is removed before
the step and rows are renormalised after it); W_enc starts as W_dec^T; b_dec (at the data mean,
as for every architecture) is subtracted before encoding. AuxK reconstructs the main residual from
the k_aux most active *dead* latents (silent for `aux_dead_tokens`), so they keep receiving gradient.

Training has two paths with the same loss and gradients (tests hold them to it):
- sparse (default): the dense encoder GEMM and top-k, then everything else touches only the k (and
  k_aux) active latents per token (models/kernels: torch ops or Triton kernels, `model.kernels`): the
  decoder is a gather-sum of k rows, its backward per-entry dot products and a scatter into W_dec's
  gradient, and the encoder's weight gradient a sparse [H, B] x [B, D] product. About
  2*B*D*H + O(B*k*D) FLOPs per step instead of ~12*B*D*H.
- dense (`model.sparse_kernels=false`): the textbook formulation, kept as the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.checks import one_of, positive
from sae_sweep.errors import ConfigError
from sae_sweep.models.base import SAE, ModelConfig, SAEOutput, dense_output, mse_per_token
from sae_sweep.models.kernels import Code, Selection, fired, sparse_decode, sparse_encode, topk_code
from sae_sweep.models.kernels.choice import kernels_problem

KERNELS = ("auto", "torch", "triton")  # model.kernels (sae_sweep/models/kernels)


@dataclass
class TopKConfig(ModelConfig):
    name: str = "topk"
    k: int = 32  # latents kept per token (the target L0)
    aux_k_coef: float = 1 / 32  # weight of the AuxK loss on dead latents (Gao et al.); 0 = no AuxK
    aux_k: int | None = None  # dead latents used by AuxK; null = d_in / 2
    aux_dead_tokens: int = 1_000_000  # a latent silent this many tokens feeds AuxK
    sparse_kernels: bool = True  # train through the active latents only (false = the dense reference)
    # the sparse path: auto | torch | triton (Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU);
    # auto = torch until a GPU benchmark records Triton faster (models/kernels)
    kernels: str = "auto"


def topk_relu(pre_BH: Tensor, k: int) -> Tensor:
    """Dense [B, H] tensor holding the k largest relu(pre) per row, zeros elsewhere."""
    values, indices = pre_BH.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BH).scatter_(-1, indices, torch.relu(values))


def remove_radial_part(grad_HD: Tensor, W_HD: Tensor) -> None:
    """In place: take from each unit row's gradient its component along the row (it would change only
    the norm, which is renormalised to 1 after the step). [..., H, D]; two passes, a dot product per
    row and a fused multiply-subtract."""
    grad_HD.addcmul_(W_HD, torch.linalg.vecdot(grad_HD, W_HD).unsqueeze(-1), value=-1)


class TopKSAE(SAE):
    architecture = "topk"
    config_class = TopKConfig
    family = "topk"
    # 1e-2: 3e-2 was worse wherever measured; 400 steps: 2048 at 1M tokens beat 4096 by 0.034 MCC
    budget_lr_cap = 1e-2
    budget_lr_d_in = 128  # above it the short-budget lr falls as 1/sqrt(d_in): best 4e-3 at d_in 768
    budget_min_steps = 400
    penalty = "no penalty: keeps the k largest pre-activations per token (AuxK trains dead latents)"
    saelens_architecture = "topk"
    subtract_b_dec_default = True
    tokens_since_fired: Tensor

    @classmethod
    def sae_args(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None) -> dict[str, Any]:
        """The constructor's arguments from a config (`kernels` already resolved for the device)."""
        return dict(
            d_in=d_in,
            hidden=hidden,
            k=cfg.k,
            aux_k=cfg.aux_k,
            aux_k_coef=cfg.aux_k_coef,
            aux_dead_tokens=cfg.aux_dead_tokens,
            generator=generator,
            sparse_kernels=cfg.sparse_kernels,
            kernels=cfg.kernels if cfg.kernels != "auto" else "torch",
        )

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None = None) -> SAE:
        return cls(**cls.sae_args(cfg, d_in, hidden, generator))

    @classmethod
    def default_lr(cls, d_in: int, hidden: int) -> float:
        """Gao et al.'s 2e-4 / sqrt(hidden / 2^14)."""
        return 2e-4 / math.sqrt(hidden / 2**14)

    @classmethod
    def check_config(cls, cfg: Any, l1_lambda: float | None, hidden_dim: int | None) -> None:
        super().check_config(cfg, l1_lambda, hidden_dim)
        if cfg.k is None or cfg.k < 1:
            raise ConfigError(
                "model.k", cfg.k, f"a positive integer (latents per token) for model={cls.architecture}"
            )
        if hidden_dim is not None and cfg.k > hidden_dim:
            raise ConfigError("model.k", cfg.k, f"at most hidden_dim ({hidden_dim})")
        if cfg.aux_k_coef != 0:
            positive("model.aux_k_coef", cfg.aux_k_coef)
        if cfg.aux_k is not None and cfg.aux_k < 1:
            raise ConfigError("model.aux_k", cfg.aux_k, "a positive integer or null (= d_in / 2)")
        positive("model.aux_dead_tokens", cfg.aux_dead_tokens)
        one_of("model.kernels", cfg.kernels, KERNELS)

    @classmethod
    def check_device(cls, cfg: Any, device: torch.device) -> None:
        problem = kernels_problem(cfg.kernels, device)
        if problem is not None:
            raise ConfigError("model.kernels", cfg.kernels, problem)

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
        kernels: str = "torch",
    ):
        super().__init__(d_in, hidden, dec_init_norm=1.0, generator=generator)
        self.k = k
        self.aux_k = min(aux_k if aux_k is not None else max(d_in // 2, 1), hidden)
        self.aux_k_coef = aux_k_coef
        self.aux_dead_tokens = aux_dead_tokens
        self.sparse_kernels = sparse_kernels
        self.kernels = kernels  # "torch" | "triton": who runs the sparse path (resolved, not "auto")
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
        # A subclass that changes `select` has a sparse path only if it changes `select_code` too.
        own_code = type(self).select is TopKSAE.select or type(self).select_code is not TopKSAE.select_code
        if self.sparse_kernels and own_code:
            return self._forward_sparse(x_BD)
        pre_BH = self.pre_acts(x_BD)
        f_BH = self.select(pre_BH)
        x_hat_BD = self.decode(f_BH)
        return dense_output(x_BD, x_hat_BD, f_BH, x_BD.new_zeros(()), self.aux_loss(x_BD, x_hat_BD, pre_BH))

    def select_code(self, pre_BH: Tensor) -> Code:
        """The sparse path's selection (BatchTopK overrides this, as it does `select`)."""
        return topk_code(pre_BH, self.k)

    def sparse_reconstruct(self, x_BD: Tensor, code: Code) -> tuple[Tensor, Tensor]:
        """(x_hat, extra loss carried in `aux`) from the sparse path's code; Matryoshka adds its inner
        prefixes' errors here."""
        x_hat_BD = sparse_decode(code, self.W_dec, self.kernels) + self.b_dec
        return x_hat_BD, x_BD.new_zeros((), dtype=torch.float32)

    def _forward_sparse(self, x_BD: Tensor) -> SAEOutput:
        dead_H = self._dead() if self.aux_k_coef > 0 else None
        # The AuxK pass costs more than the main one (k_aux = d_in/2 >> k); skip it while nothing is
        # dead. Asking costs a host sync, free on CPU; on CUDA the masked pass runs instead.
        if dead_H is not None and x_BD.device.type == "cpu" and not bool(dead_H.any()):
            dead_H = None
        how = Selection(self.select_code, dead_H, self.aux_k, self.subtract_b_dec, self.kernels)
        code, aux_code = sparse_encode(x_BD, self.W_enc, self.b_enc, self.b_dec, how)
        x_hat_BD, aux = self.sparse_reconstruct(x_BD, code)
        if dead_H is not None:
            residual_BD = (x_BD - x_hat_BD).detach()
            residual_hat_BD = sparse_decode(aux_code, self.W_dec, self.kernels)
            aux = aux + self._aux_scale() * mse_per_token(residual_BD, residual_hat_BD)
        return SAEOutput(
            x_hat_BD,
            None,
            mse_per_token(x_BD, x_hat_BD),
            x_BD.new_zeros(()),
            aux,
            fired_H=fired(code, self.hidden),
            l0=(code.vals > 0).sum().float() / x_BD.shape[0],
        )

    def aux_loss(self, x_BD: Tensor, x_hat_BD: Tensor, pre_BH: Tensor) -> Tensor:
        if self.aux_k_coef == 0:
            return x_BD.new_zeros((), dtype=torch.float32)
        masked_pre_BH = torch.where(self._dead(), pre_BH, torch.full_like(pre_BH, -torch.inf))
        f_aux_BH = topk_relu(masked_pre_BH, self.aux_k).nan_to_num(0.0)
        residual_BD = (x_BD - x_hat_BD).detach()
        return self._aux_scale() * mse_per_token(residual_BD, f_aux_BH @ self.W_dec)

    @torch.no_grad()  # with grad on, the product with W_dec gave the gradient a graph kept each step
    def before_optimizer_step(self) -> None:
        # Remove the gradient component parallel to each (unit) decoder row: it would only change the norm.
        if self.W_dec.grad is not None:
            remove_radial_part(self.W_dec.grad, self.W_dec)

    def after_optimizer_step(self, fired_H: Tensor, n_tokens: int) -> None:
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.tokens_since_fired += n_tokens
            self.tokens_since_fired.masked_fill_(fired_H, 0)
