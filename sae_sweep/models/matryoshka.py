"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): nested prefix reconstruction losses.

The latents form nested prefixes of widths m_1 < m_2 < ... < m_G = hidden. BatchTopK (the batch keeps
its batch_size * k largest ReLU pre-activations) selects f once over all latents; each prefix then
reconstructs x from its own latents only, and the loss is the sum of their errors:

    x_hat_g = f[:, :m_g] @ W_dec[:m_g] + b_dec;   loss = sum_g mean_t ||x - x_hat_g||^2  (+ AuxK)

The first latents must reconstruct x on their own, so general features settle there and the specific
ones that a wide SAE folds into them (feature absorption) are left to later latents. The full-width
term is the usual `mse`; the inner ones travel in `aux` with AuxK. Inference is BatchTopK's running
threshold (f = pre where pre > threshold), which SAELens loads as jumprelu.

Prefix widths are `model.prefix_fractions` of hidden, then hidden itself (default 1/16, 1/4, 1: each
prefix 4x the last). The reconstructions are built group by group (prefix g adds latents m_{g-1}..m_g
to prefix g-1), so all of them together cost one decode: on the sparse path (default) one bagged
decode of the active entries (models/kernels), on the dense one (`model.sparse_kernels=false`) a
matmul per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sae_sweep.errors import ConfigError
from sae_sweep.models.base import SAE, SAEOutput, dense_output, mse_per_token
from sae_sweep.models.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae_sweep.models.kernels import Code, sparse_decode_prefixes


@dataclass
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    name: str = "matryoshka_batchtopk"
    # widths of the inner prefixes as shares of hidden, increasing, each in (0, 1); all latents are the last
    prefix_fractions: list[float] = field(default_factory=lambda: [1 / 16, 1 / 4])


def prefix_widths(fractions: list[float], hidden: int) -> list[int]:
    """The nested widths m_1 < ... < m_G = hidden; ConfigError if two round to the same width."""
    widths = [round(f * hidden) for f in fractions] + [hidden]
    if any(w < 1 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
        raise ConfigError(
            "model.prefix_fractions",
            list(fractions),
            f"increasing shares in (0, 1) giving distinct widths of at least 1 latent out of {hidden} "
            f"(these give {widths})",
        )
    return widths


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    config_class = MatryoshkaBatchTopKConfig
    penalty = "no penalty: BatchTopK; the loss sums the MSE of each nested prefix's reconstruction"

    def __init__(self, *args: Any, prefix_fractions: list[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prefix_widths = prefix_widths(list(prefix_fractions), self.hidden)

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None = None) -> SAE:
        return cls(
            d_in,
            hidden,
            cfg.k,
            cfg.aux_k,
            cfg.aux_k_coef,
            cfg.aux_dead_tokens,
            generator=generator,
            sparse_kernels=cfg.sparse_kernels,
            threshold_momentum=cfg.threshold_momentum,
            prefix_fractions=list(cfg.prefix_fractions),
        )

    @classmethod
    def check_config(cls, cfg: Any, l1_lambda: float | None, hidden_dim: int | None) -> None:
        super().check_config(cfg, l1_lambda, hidden_dim)
        fractions = list(cfg.prefix_fractions)
        if any(not 0 < f < 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise ConfigError("model.prefix_fractions", fractions, "increasing shares in (0, 1)")
        if hidden_dim is not None:
            prefix_widths(fractions, hidden_dim)

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k, "prefix_widths": self.prefix_widths}

    def group_decode(self, f_BH: Tensor, start: int, end: int) -> Tensor:
        """What latents start..end add to a reconstruction (no bias): the decode step of one group."""
        return f_BH[:, start:end] @ self.W_dec[start:end]

    def prefix_reconstructions(self, f_BH: Tensor) -> list[Tensor]:
        """x_hat_g for every prefix, narrowest first; the last is the full reconstruction."""
        out, partial, start = [], None, 0
        for end in self.prefix_widths:
            group = self.group_decode(f_BH, start, end)
            partial = group if partial is None else partial + group
            out.append(partial + self.b_dec)
            start = end
        return out

    def sparse_reconstruct(self, x_BD: Tensor, code: Code) -> tuple[Tensor, Tensor]:
        """The sparse path's reconstructions of every prefix in one decode; the inner errors go to aux."""
        x_hats = sparse_decode_prefixes(code, self.W_dec, self.prefix_widths, self.kernels) + self.b_dec
        inner = x_BD.new_zeros((), dtype=torch.float32)
        for x_hat_g in x_hats[:-1]:
            inner = inner + mse_per_token(x_BD, x_hat_g)
        return x_hats[-1], inner

    def forward(self, x_BD: Tensor) -> SAEOutput:
        if self.sparse_kernels:  # BatchTopK's sparse path, with sparse_reconstruct above
            return super().forward(x_BD)
        pre_BH = self.pre_acts(x_BD)
        f_BH = self.select(pre_BH)  # BatchTopK over all latents (updates the inference threshold)
        *inner, x_hat_BD = self.prefix_reconstructions(f_BH)
        aux = self.aux_loss(x_BD, x_hat_BD, pre_BH)
        for x_hat_g in inner:
            aux = aux + mse_per_token(x_BD, x_hat_g)
        return dense_output(x_BD, x_hat_BD, f_BH, x_BD.new_zeros(()), aux)
