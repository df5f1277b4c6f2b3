"""The small interface every SAE architecture implements, and the plain saved form they share.

Shapes: B tokens, D = d_in, H = hidden latents. Training happens on normalised inputs
(x_norm = scale_factor * x_raw); `plain_tensors(scale)` folds the scale (and a pre-encoder bias, if
the architecture uses one) into weights that apply to raw activations:

    pre = x_raw @ W_enc + b_enc;  f = activation(pre);  x_hat_raw = f @ W_dec + b_dec

The latents f are identical in both forms, so thresholds and k carry over unchanged.

An architecture is one class (a subclass of `SAE`) that declares how it is trained, next to its config
dataclass (a subclass of `ModelConfig`, whose fields are its `model.*` keys):

- `architecture`: its name (`model=<name>`); `config_class`: its keys and their defaults;
- `family`: `penalty` (the loss adds `l1_lambda` x `sparsity_metric`, which `penalty` describes; its
  default coefficient is `default_coef`) or `topk` (k latents chosen per token or batch, no coefficient);
- `default_dec_init_norm`: the decoder rows' initial norm; `default_lr(d_in, hidden)`: the lr rule;
- `budget_lr_cap`, `budget_lr_d_in`, `budget_min_steps`: its short-budget recipe (sae_sweep.recipe;
  None: none);
- `saelens_architecture`: the SAELens form it is exported as;
- `from_config(model_cfg, d_in, hidden, generator)` builds it; `check_config(...)` checks its keys.

`sae_sweep.models.registry` maps names to these classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_sweep.checks import positive
from sae_sweep.errors import ConfigError

FAMILIES = ("penalty", "topk")


@dataclass
class ModelConfig:
    """`model.*`: the architecture's name; each architecture's config subclass adds its own keys."""

    name: str = "relu"  # architecture (`model=NAME`; `--help` lists them)


@dataclass
class SAEOutput:
    x_hat: Tensor  # [B, D] reconstruction
    f: Tensor | None  # [B, H] latents used for the reconstruction (None on sparse paths)
    mse: Tensor  # scalar: mean_t ||x - x_hat||^2
    sparsity: Tensor  # scalar penalty the trainer multiplies by l1_lambda (0 for the TopK family)
    aux: Tensor  # scalar auxiliary loss, already weighted (AuxK); 0 where unused
    fired_H: Tensor  # bool [H]: latents that fired at least once in the batch
    l0: Tensor  # scalar: mean_t #{i : f_i > 0}


def dense_output(x_BD: Tensor, x_hat_BD: Tensor, f_BH: Tensor, sparsity: Tensor, aux: Tensor) -> SAEOutput:
    """SAEOutput of an architecture that materialises the dense latents."""
    active_BH = f_BH > 0
    return SAEOutput(
        x_hat_BD,
        f_BH,
        mse_per_token(x_BD, x_hat_BD),
        sparsity,
        aux,
        fired_H=active_BH.any(0),
        l0=active_BH.sum(-1).float().mean(),
    )


class _SquaredError(torch.autograd.Function):
    """||x - x_hat||^2 over the last dim, averaged over the one before, in fp32. Three passes over the
    [B, D] tensors (the difference, its squared norms, the gradient) where autograd's chain of sub,
    pow, sum and mean makes eight: on CPU each pass is memory-bound, a few ms at batch 4096 x d_in 768.
    The values and gradients are the same, bit for bit."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_hat: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            diff = (x_hat - x).float()
            ctx.save_for_backward(diff)
            ctx.dtypes = (x.dtype, x_hat.dtype)
            return torch.linalg.vecdot(diff, diff).mean(-1)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:  # pyright: ignore[reportIncompatibleMethodOverride]
        (diff,) = ctx.saved_tensors
        # mean's 1/B, then pow's 2 (exact): the same rounding as autograd's chain
        grad_hat = diff * (g / diff.shape[-2] * 2)[..., None, None]
        x_dtype, x_hat_dtype = ctx.dtypes
        grad_x = (-grad_hat).to(x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_hat.to(x_hat_dtype) if ctx.needs_input_grad[1] else None


def mse_per_token(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over dims, averaged over tokens (the `mse` of metrics.json); for [..., B, D]
    inputs, one value per leading index."""
    return _SquaredError.apply(x, x_hat)


class SAE(nn.Module):
    """Base: tied initialisation, linear decode, folding into the plain form, and no-op hooks."""

    architecture: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    family: ClassVar[str]  # one of FAMILIES
    sparsity_metric: ClassVar[str | None] = None  # metric the penalty is on (penalty family); None = none
    penalty: ClassVar[str] = "no penalty"  # what the loss adds to the MSE, in words (for --help)
    default_coef: ClassVar[float | None] = None  # l1_lambda when it is null; None = takes no l1_lambda
    # The short-budget recipe (sae_sweep.recipe), measured on the quality suite: a null lr is default_lr
    # x sqrt(80000 / steps) (x sqrt(budget_lr_d_in / d_in) above that d_in), at most budget_lr_cap; a
    # null batch_size halves from 4096 while the budget gives fewer than budget_min_steps steps (down to
    # 1024). None: default_lr and 4096 at any budget; budget_lr_d_in None: no d_in factor.
    budget_lr_cap: ClassVar[float | None] = None
    budget_lr_d_in: ClassVar[int | None] = None
    budget_min_steps: ClassVar[int | None] = None
    default_dec_init_norm: ClassVar[float] = 1.0
    saelens_architecture: ClassVar[str]
    # Architectures that subtract b_dec before encoding (Gao et al.) set this; folded away at save time.
    subtract_b_dec_default: ClassVar[bool] = False

    # --- what the architecture declares -------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, d_in: int, hidden: int, generator: torch.Generator | None = None) -> SAE:
        """A freshly initialised SAE from this architecture's config (an instance of config_class)."""
        raise NotImplementedError

    @classmethod
    def check_device(cls, cfg: Any, device: torch.device) -> None:
        """Raise ConfigError for a value that cannot run on the run's device (e.g. model.kernels)."""

    @classmethod
    def inference_form_matches(cls, threshold_H: Tensor) -> bool:
        """Whether an imported inference threshold is one this architecture can hold unchanged."""
        return True

    @classmethod
    def default_lr(cls, d_in: int, hidden: int) -> float:
        """The learning rate when `lr` is null: 1e-3 at d_in = 128, scaled by 1/sqrt(d_in).

        Adam moves every weight by about lr per step while the initial weights are ~0.1/sqrt(d_in), so
        this keeps the relative step the same at every width (at d_in = 3072 it is 2e-4). The
        April-2024 recipe's 5e-5 is tuned for billions of tokens; a sweep trial gets millions.
        """
        return 1e-3 * math.sqrt(128 / d_in)

    @classmethod
    def recipe(
        cls, d_in: int, hidden_dim: int | None, l1_lambda: float | None, lr: float | None
    ) -> tuple[int, float | None, float]:
        """(hidden, l1_lambda, lr) a run uses where those keys are null; l1_lambda is None where unused."""
        hidden = hidden_dim or 8 * d_in
        coef = None
        if cls.default_coef is not None:
            coef = l1_lambda if l1_lambda is not None else cls.default_coef
        return hidden, coef, lr if lr is not None else cls.default_lr(d_in, hidden)

    @classmethod
    def check_config(cls, cfg: Any, l1_lambda: float | None, hidden_dim: int | None) -> None:
        """Raise ConfigError for a value this architecture cannot train with (hidden_dim None = unknown)."""
        if cls.default_coef is None:
            if l1_lambda is not None:
                raise ConfigError(
                    "l1_lambda",
                    l1_lambda,
                    f"nothing with model={cls.architecture}: its sparsity is set by model.k (drop "
                    "l1_lambda, or use a model of the penalty family, e.g. relu; --help lists them)",
                )
        elif not math.isfinite(l1_lambda if l1_lambda is not None else 0.0) or (l1_lambda or 0.0) < 0:
            raise ConfigError("l1_lambda", l1_lambda, "a finite number >= 0 (0 = no sparsity penalty)")
        positive("model.dec_init_norm", getattr(cfg, "dec_init_norm", None), allow_none=True)

    def __init__(self, d_in: int, hidden: int, dec_init_norm: float, generator: torch.Generator | None):
        super().__init__()
        self.d_in, self.hidden = d_in, hidden
        W_dec_HD = torch.randn(hidden, d_in, generator=generator)
        W_dec_HD *= dec_init_norm / W_dec_HD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_HD)
        self.W_enc = nn.Parameter(W_dec_HD.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(hidden))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.subtract_b_dec = self.subtract_b_dec_default

    # --- the interface -------------------------------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        if self.subtract_b_dec:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        """Inference latents (what a saved SAE computes)."""
        raise NotImplementedError

    def decode(self, f_BH: Tensor) -> Tensor:
        return f_BH @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> SAEOutput:
        """Training forward pass with its loss terms."""
        raise NotImplementedError

    def dec_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    def init_from_data(self, x_sample_BD: Tensor) -> None:
        """Data-dependent initialisation from a normalised sample: b_dec at the data mean, so that a
        short run need not spend its first steps walking the decoder bias to the data's offset."""
        with torch.no_grad():
            self.b_dec.copy_(x_sample_BD.float().mean(0))

    def before_optimizer_step(self) -> None:
        """Called after backward and gradient clipping, before the optimizer step."""

    def after_optimizer_step(self, fired_H: Tensor, n_tokens: int) -> None:
        """Called after each optimizer step with which latents fired in the batch."""

    def hyperparameters(self) -> dict[str, Any]:
        """Architecture settings saved as metadata (k, ...)."""
        return {}

    # --- saving --------------------------------------------------------------------------------
    def plain_tensors(self, scale_factor: float) -> dict[str, Tensor]:
        """Weights that apply to raw activations: scale and pre-encoder bias folded in."""
        W_enc, b_enc = self.W_enc.detach().float(), self.b_enc.detach().float()
        W_dec, b_dec = self.W_dec.detach().float(), self.b_dec.detach().float()
        if self.subtract_b_dec:
            b_enc = b_enc - b_dec @ W_enc
        tensors = {
            "W_enc": (W_enc * scale_factor).contiguous(),
            "b_enc": b_enc.contiguous(),
            "W_dec": (W_dec / scale_factor).contiguous(),
            "b_dec": (b_dec / scale_factor).contiguous(),
        }
        threshold = self.inference_threshold()
        if threshold is not None:
            tensors["threshold"] = threshold.detach().float().contiguous()
        return tensors

    def inference_threshold(self) -> Tensor | None:
        """[H] threshold for architectures whose inference is `pre where pre > threshold`."""
        return None

    def load_plain(self, tensors: dict[str, Tensor]) -> None:
        """Load the plain form (no pre-encoder bias, scale already folded)."""
        self.subtract_b_dec = False
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self, name).copy_(tensors[name])
            if "threshold" in tensors:
                self.set_inference_threshold(tensors["threshold"])

    def set_inference_threshold(self, threshold_H: Tensor) -> None:
        raise ValueError(f"{self.architecture} has no inference threshold")
