"""How the metrics are measured: streaming accumulators over held-out batches, the dead-latent window,
feature density, and matching learned decoder directions to true features (MCC, F1).

Each metric's name, direction and one-line definition are in the registry, sae_sweep/metrics.py.
Shapes: B tokens, D = d_in, H = hidden latents, N = true features (synthetic data).
Streaming accumulators keep their sums on the tensors' device and never call `.item()` in
`update()`, so the trainer's GPU pipeline is not stalled; `compute()` syncs once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sae_sweep.metrics import DENSE_THRESHOLD

# Total variance at or below this share of sum ||x||^2 is float64 round-off of a constant x: fvu -> nan.
_ZERO_VARIANCE_RTOL = 1e-12


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 upcast to fp32 for per-token sums; fp64 inputs keep their precision."""
    return t if t.dtype == torch.float64 else t.float()


def _zeros(device: torch.device | str, dtype: torch.dtype = torch.float64, *shape: int) -> Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


class DeadLatentTracker:
    """Per-latent count of training tokens since the latent last fired.

    Dead = silent for `window_used()` = min(window_tokens, tokens_seen) tokens, so early in training
    (fewer tokens than the window) a latent is dead only if it has never fired. A batch in which a
    latent fired resets its count to 0 (batch granularity: we do not know where in the batch it fired).
    """

    def __init__(self, hidden: int, window_tokens: int, device: torch.device | str = "cpu") -> None:
        if window_tokens <= 0:
            raise ValueError(f"window_tokens must be positive, got {window_tokens}")
        self.hidden, self.window_tokens = hidden, window_tokens
        self.tokens_seen = 0  # a host int: n_tokens arrives as an int, so no device sync
        self.tokens_since_fired_H = _zeros(device, torch.int64, hidden)

    def update(self, fired_H: Tensor, n_tokens: int) -> None:
        if fired_H.shape != (self.hidden,):
            raise ValueError(f"fired_H must have shape ({self.hidden},), got {tuple(fired_H.shape)}")
        fired_H = fired_H.to(self.tokens_since_fired_H.device, torch.bool)
        # torch.where instead of boolean-mask assignment: mask indexing would sync with the device.
        self.tokens_since_fired_H = torch.where(fired_H, 0, self.tokens_since_fired_H + n_tokens)
        self.tokens_seen += n_tokens

    def window_used(self) -> int:
        return min(self.window_tokens, self.tokens_seen)

    def dead_mask(self) -> Tensor:
        if self.tokens_seen == 0:  # nothing observed yet: no evidence that anything is dead
            return torch.zeros_like(self.tokens_since_fired_H, dtype=torch.bool)
        return self.tokens_since_fired_H >= self.window_used()

    def dead_frac(self) -> float:
        return self.dead_mask().double().mean().item()

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired": self.tokens_since_fired_H.cpu(), "tokens_seen": self.tokens_seen}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore counts; the window stays the constructor's (the config is the authority)."""
        counts = d["tokens_since_fired"]
        if counts.shape != (self.hidden,):
            raise ValueError(f"tracker state has {tuple(counts.shape)} latents, expected ({self.hidden},)")
        self.tokens_since_fired_H = counts.to(self.tokens_since_fired_H.device, torch.int64)
        self.tokens_seen = int(d["tokens_seen"])


class EvalAccumulator:
    """Streams held-out batches into float64 sums; `compute()` returns the section-5 metrics.

    Edge cases: fvu (and explained_variance) is nan when x has zero variance over the evaluated
    tokens (nothing to explain). cos_sim and l2_ratio average only over tokens with ||x|| > 0 (the
    ratio is undefined there) and are nan if every token is zero.
    """

    def __init__(self, hidden: int, device: torch.device | str = "cpu") -> None:
        self.hidden = hidden
        self.n_tokens = 0  # host ints: batch sizes are known without a sync
        self.n_batches = 0
        self.sums: dict[str, Tensor] = {
            k: _zeros(device)
            for k in ("sq_err", "x_sq", "centred_sq", "l0", "l1", "cos", "l2_ratio", "n_nonzero_x", "pct")
        }
        self.fire_count_H = _zeros(device, torch.int64, hidden)
        self.mean_x_D: Tensor | None = None  # running mean for the centred variance (D known at update)

    def update(self, x_BD: Tensor, x_hat_BD: Tensor, f_BH: Tensor, dec_norms_H: Tensor) -> None:
        self._check_shapes(x_BD, x_hat_BD, f_BH, dec_norms_H)
        n_b = x_BD.shape[0]
        if n_b == 0:
            return
        x, x_hat = _at_least_fp32(x_BD), _at_least_fp32(x_hat_BD)
        s = self.sums
        s["sq_err"] += (x - x_hat).pow(2).sum(-1).sum(dtype=torch.float64)
        s["x_sq"] += x.pow(2).sum(dtype=torch.float64)
        self._update_variance(x, n_a=self.n_tokens, n_b=n_b)

        active_BH = f_BH > 0
        s["l0"] += active_BH.sum(dtype=torch.float64)
        s["l1"] += (f_BH.sum(0, dtype=torch.float64) * dec_norms_H.double()).sum()
        fired_H = active_BH.any(0)
        s["pct"] += 100.0 * fired_H.double().mean()
        self.fire_count_H += active_BH.sum(0)

        x_norm_B, x_hat_norm_B = x.norm(dim=-1), x_hat.norm(dim=-1)
        valid_B = x_norm_B > 0
        safe_x_norm_B = torch.where(valid_B, x_norm_B, 1.0)
        # cos is 0 (not nan) when x_hat = 0 but x != 0: a zero reconstruction points nowhere.
        cos_B = (x * x_hat).sum(-1) / (safe_x_norm_B * x_hat_norm_B).clamp_min(torch.finfo(x.dtype).tiny)
        s["cos"] += torch.where(valid_B, cos_B, 0.0).sum(dtype=torch.float64)
        s["l2_ratio"] += torch.where(valid_B, x_hat_norm_B / safe_x_norm_B, 0.0).sum(dtype=torch.float64)
        s["n_nonzero_x"] += valid_B.sum(dtype=torch.float64)

        self.n_tokens += n_b
        self.n_batches += 1

    def _check_shapes(self, x_BD: Tensor, x_hat_BD: Tensor, f_BH: Tensor, dec_norms_H: Tensor) -> None:
        if x_BD.ndim != 2 or x_hat_BD.shape != x_BD.shape:
            raise ValueError(f"x {tuple(x_BD.shape)} and x_hat {tuple(x_hat_BD.shape)} must both be [B, D]")
        if f_BH.shape != (x_BD.shape[0], self.hidden) or dec_norms_H.shape != (self.hidden,):
            raise ValueError(
                f"f {tuple(f_BH.shape)} must be [{x_BD.shape[0]}, {self.hidden}] and dec_norms "
                f"{tuple(dec_norms_H.shape)} must be [{self.hidden}]"
            )

    def _update_variance(self, x: Tensor, n_a: int, n_b: int) -> None:
        """Chan et al.'s pairwise merge of (mean, sum of squared deviations): centring each batch by
        its own mean avoids the cancellation of sum||x||^2 - n||mean||^2 when the mean is large."""
        mean_b_D = x.sum(0, dtype=torch.float64) / n_b
        centred_b = (x - mean_b_D.to(x.dtype)).pow(2).sum(dtype=torch.float64)
        if self.mean_x_D is None:
            self.mean_x_D = mean_b_D
            self.sums["centred_sq"] += centred_b
            return
        delta_D = mean_b_D - self.mean_x_D
        self.sums["centred_sq"] += centred_b + delta_D.pow(2).sum() * (n_a * n_b / (n_a + n_b))
        self.mean_x_D = self.mean_x_D + delta_D * (n_b / (n_a + n_b))

    def density(self) -> Tensor:
        """[H] share of evaluated tokens on which each latent fired."""
        return self.fire_count_H.double() / max(self.n_tokens, 1)

    def compute(self) -> dict[str, float]:
        if self.n_tokens == 0:
            raise ValueError("EvalAccumulator.compute() called before any non-empty batch was added")
        keys = list(self.sums)
        # one sync for all sums
        totals = dict(zip(keys, torch.stack([self.sums[k] for k in keys]).tolist(), strict=True))
        n = self.n_tokens
        zero_variance = totals["centred_sq"] <= _ZERO_VARIANCE_RTOL * totals["x_sq"]
        fvu = float("nan") if zero_variance else totals["sq_err"] / totals["centred_sq"]
        n_valid = totals["n_nonzero_x"]
        return {
            "mse": totals["sq_err"] / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": totals["l0"] / n,
            "l1": totals["l1"] / n,
            "cos_sim": totals["cos"] / n_valid if n_valid else float("nan"),
            "l2_ratio": totals["l2_ratio"] / n_valid if n_valid else float("nan"),
            "pct_active_batch": totals["pct"] / self.n_batches,
            "dense_frac": (self.density() > DENSE_THRESHOLD).double().mean().item(),
            "n_eval_tokens": n,
        }


def density_histogram(
    density_H: Tensor, bins: int = 30, range_log10: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Histogram of log10 firing density. Never-fired latents (log10 0 = -inf) are counted apart.

    `range_log10` fixes the edges (to compare runs on one axis); by default they span the data
    (numpy's rule: a single value gets a unit-wide range around it, no fired latents gives [0, 1]).
    """
    density = density_H.detach().double().cpu().numpy()
    fired = density > 0
    counts, edges = np.histogram(np.log10(density[fired]), bins=bins, range=range_log10)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "never_fired": int((~fired).sum())}


def _abs_cos_matrix(true_features_ND: Tensor, W_dec_HD: Tensor) -> Tensor:
    """[N, H] |cos| between true features and decoder rows (zero rows give 0, not nan)."""
    t = torch.nn.functional.normalize(true_features_ND.double(), dim=1)
    w = torch.nn.functional.normalize(W_dec_HD.detach().double().to(t.device), dim=1)
    return (t @ w.T).abs()


def match_features(true_features_ND: Tensor, W_dec_HD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-one matching of true features to decoder rows maximising total |cos| (Hungarian).

    Returns (true_idx, latent_idx, abs_cos) for the min(N, H) matched pairs, sorted by true_idx, on
    W_dec's device. Greedy matching would let one latent's best pair steal another's; the Hungarian
    assignment is the optimum. Cost is O(N H min(N, H)) on the CPU: fine up to a few thousand latents.
    """
    abs_cos_NH = _abs_cos_matrix(true_features_ND, W_dec_HD).cpu().numpy()
    if not np.isfinite(abs_cos_NH).all():
        raise ValueError("match_features: true features or decoder contain nan/inf")
    rows, cols = linear_sum_assignment(abs_cos_NH, maximize=True)
    device = W_dec_HD.device
    return (
        torch.as_tensor(rows, dtype=torch.long, device=device),
        torch.as_tensor(cols, dtype=torch.long, device=device),
        torch.as_tensor(abs_cos_NH[rows, cols], dtype=torch.float32, device=device),
    )


def mcc_of_matches(abs_cos: Tensor, n_true: int) -> float:
    """Mean |cos| of the matched pairs over all `n_true` true features: a feature left unmatched (an SAE
    narrower than the truth) counts 0, so a narrow SAE cannot score above a full-width one."""
    return abs_cos.double().sum().item() / max(1, n_true)


def mcc(true_features_ND: Tensor, W_dec_HD: Tensor) -> float:
    """Mean over all N true features of the |cos| to its Hungarian-matched decoder row (0 for the
    features an SAE with H < N leaves unmatched). nan when the decoder is not finite (a diverged run)."""
    if not bool(torch.isfinite(W_dec_HD).all()):
        return float("nan")
    return mcc_of_matches(match_features(true_features_ND, W_dec_HD)[2], true_features_ND.shape[0])


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0 (e.g. precision of a latent that never fires)."""
    return torch.where(den > 0, num / den.clamp_min(1), 0.0)


class F1Accumulator:
    """Per matched pair: precision/recall/F1 of the latent firing (f > 0) against its true feature.

    A pair with no positives on either side (latent and feature both silent) scores 0: there is no
    evidence the latent tracks the feature. Counts stay on the device; `compute()` syncs once.
    """

    def __init__(self, true_idx: Tensor, latent_idx: Tensor) -> None:
        if true_idx.shape != latent_idx.shape or true_idx.ndim != 1:
            raise ValueError("true_idx and latent_idx must be 1-D and of equal length")
        self.true_idx, self.latent_idx = true_idx.long(), latent_idx.long()
        self.counts: dict[str, Tensor] | None = None  # tp/fp/fn, created on the first batch's device

    def update(self, f_BH: Tensor, true_active_BN: Tensor) -> None:
        device = f_BH.device
        pred_BP = f_BH[:, self.latent_idx.to(device)] > 0
        truth_BP = true_active_BN.to(device, torch.bool)[:, self.true_idx.to(device)]
        batch = {
            "tp": (pred_BP & truth_BP).sum(0),
            "fp": (pred_BP & ~truth_BP).sum(0),
            "fn": (~pred_BP & truth_BP).sum(0),
        }
        if self.counts is None:
            self.counts = batch
        else:
            for k, v in batch.items():
                self.counts[k] += v

    def compute(self) -> dict[str, Any]:
        n_pairs = self.true_idx.numel()
        if self.counts is None:
            tp = fp = fn = torch.zeros(n_pairs, dtype=torch.float64)
        else:
            tp, fp, fn = torch.stack([self.counts[k] for k in ("tp", "fp", "fn")]).double().cpu()
        precision, recall = _safe_ratio(tp, tp + fp), _safe_ratio(tp, tp + fn)
        f1 = _safe_ratio(2 * tp, 2 * tp + fp + fn)
        return {
            "f1_mean": f1.mean().item() if n_pairs else float("nan"),
            "precision_mean": precision.mean().item() if n_pairs else float("nan"),
            "recall_mean": recall.mean().item() if n_pairs else float("nan"),
            "f1": f1,
            "precision": precision,
            "recall": recall,
        }
