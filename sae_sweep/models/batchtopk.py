"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch during training.

The batch keeps its batch_size * k largest ReLU pre-activations, so tokens may use more or fewer
than k latents while the mean stays k. Inference cannot see a batch, so a running threshold (EMA of
the smallest kept activation) replaces it: f = pre where pre > threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.checks import fraction
from sae_sweep.models.base import SAE
from sae_sweep.models.kernels import Code, batch_topk_code
from sae_sweep.models.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    name: str = "batchtopk"
    threshold_momentum: float = 0.99  # EMA momentum of the inference threshold


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    config_class = BatchTopKConfig
    penalty = "no penalty: keeps the batch_size * k largest pre-activations of the batch (AuxK as topk)"
    saelens_architecture = "jumprelu"  # inference is `pre where pre > threshold`
    threshold: Tensor  # buffers (checkpointed): the running inference threshold and whether it is set
    threshold_initialised: Tensor

    def __init__(self, *args: Any, threshold_momentum: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_config(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None = None) -> SAE:
        return cls(**cls.sae_args(cfg, d_in, hidden, generator), threshold_momentum=cfg.threshold_momentum)

    @classmethod
    def check_config(cls, cfg: Any, l1_lambda: float | None, hidden_dim: int | None) -> None:
        super().check_config(cfg, l1_lambda, hidden_dim)
        fraction("model.threshold_momentum", cfg.threshold_momentum)

    @classmethod
    def inference_form_matches(cls, threshold_H: Tensor) -> bool:
        """Whether a SAELens jumprelu threshold is one of ours: BatchTopK's is one number for all latents."""
        return bool((threshold_H == threshold_H[0]).all())

    def select(self, pre_BH: Tensor) -> Tensor:
        relu_flat = torch.relu(pre_BH).flatten()
        n_keep = min(self.k * pre_BH.shape[0], relu_flat.numel())
        values, indices = relu_flat.topk(n_keep, sorted=False)
        f_BH = torch.zeros_like(relu_flat).scatter_(0, indices, values).view_as(pre_BH)
        if self.training:
            self._update_threshold(values)
        return f_BH

    def select_code(self, pre_BH: Tensor) -> Code:
        code = batch_topk_code(pre_BH, self.k * pre_BH.shape[0])
        if self.training:
            self._update_threshold(code.vals)
        return code

    @torch.no_grad()
    def _update_threshold(self, kept_values: Tensor) -> None:
        positive = kept_values.detach().float()
        smallest = torch.where(positive > 0, positive, torch.full_like(positive, torch.inf)).min()
        smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold)
        m = self.threshold_momentum
        blended = torch.where(self.threshold_initialised, m * self.threshold + (1 - m) * smallest, smallest)
        self.threshold.copy_(blended)
        self.threshold_initialised.fill_(True)

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BH = self.pre_acts(x_BD)
        return torch.where(pre_BH > self.threshold.clamp_min(0), pre_BH, torch.zeros_like(pre_BH))

    def inference_threshold(self) -> Tensor:
        return self.threshold.clamp_min(0).expand(self.hidden)

    def set_inference_threshold(self, threshold_H: Tensor) -> None:
        # Saved as [H] for a uniform file format; BatchTopK's threshold is one number.
        self.threshold.copy_(threshold_H.max())
        self.threshold_initialised.fill_(True)
