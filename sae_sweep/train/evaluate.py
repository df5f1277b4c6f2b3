"""evaluate_sae: the held-out metrics of any SAE on any dataset, in one streamed pass.

The trainer calls it at the end of every run (on the model in training form, with the run's scale
factor); the analysis notebook calls it on a loaded `sae.safetensors` (plain form, scale factor 1: the
scale is folded into its weights). On data with ground truth (data.kind=synthetic) it also matches
latents to true features (mcc) and scores each matched latent as a detector of its feature (f1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from sae_sweep.data.shards import ActivationDataset
from sae_sweep.measures import EvalAccumulator, F1Accumulator, match_features, mcc_of_matches
from sae_sweep.models import SAE

if TYPE_CHECKING:
    from sae_sweep.data.synthetic import GroundTruth


@dataclass
class Evaluation:
    """What one held-out pass measured."""

    metrics: dict[str, float]  # mse, l1, l0, explained_variance, fvu, ...; mcc and f1 with ground truth
    density: torch.Tensor  # [hidden] share of the evaluated tokens each latent fired on (CPU)
    # per-latent ground-truth scores aligned to latent index (None where a latent matched no feature):
    # matched_feature, match_cos, f1, precision, recall; empty without ground truth
    latents: dict[str, list[Any]] = field(default_factory=dict)


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    dataset: ActivationDataset,
    scale_factor: float = 1.0,
    *,
    batch_size: int = 4096,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> Evaluation:
    """Held-out metrics of `sae` on up to `max_tokens` (None = all) test tokens of `dataset`, each raw batch
    multiplied by `scale_factor` first. The model is put in eval mode for the pass and restored after."""
    device = torch.device(device) if device is not None else next(sae.parameters()).device
    was_training = sae.training
    sae.eval()
    acc = EvalAccumulator(sae.hidden, device)
    truth = cast("GroundTruth | None", dataset.ground_truth)
    f1_acc = None
    metrics: dict[str, float] = {}
    if truth is not None:
        true_idx, latent_idx, abs_cos = match_features(truth.features, sae.W_dec.detach().float().cpu())
        metrics["mcc"] = mcc_of_matches(abs_cos, truth.features.shape[0])  # unmatched features count 0
        f1_acc = F1Accumulator(true_idx.to(device), latent_idx.to(device))
    dec_norms = sae.dec_norms().float()
    for item in dataset.test_batches(batch_size, max_tokens, with_truth=truth is not None):
        x_raw, active = item if truth is not None else (item, None)
        x = x_raw.to(device) * scale_factor
        f = sae.encode(x)
        acc.update(x, sae.decode(f), f, dec_norms)
        if f1_acc is not None:
            f1_acc.update(f, cast(torch.Tensor, active).to(device))
    metrics.update(acc.compute())
    latents: dict[str, list[Any]] = {}
    if f1_acc is not None:
        f1 = f1_acc.compute()
        metrics["f1"] = float(f1["f1_mean"])
        scores = {
            "matched_feature": true_idx,
            "match_cos": abs_cos,
            "f1": f1["f1"],
            "precision": f1["precision"],
            "recall": f1["recall"],
        }
        latents = _per_latent(sae.hidden, latent_idx, scores)
    sae.train(was_training)
    return Evaluation(metrics, acc.density().cpu(), latents)


def _per_latent(hidden: int, latent_idx: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, list]:
    """Spread per-matched-pair values onto latent positions (None for latents matched to no feature)."""
    out: dict[str, list] = {}
    positions = latent_idx.tolist()
    for name, vals in values.items():
        column: list[Any] = [None] * hidden
        for pos, v in zip(positions, vals.tolist(), strict=True):
            column[pos] = v
        out[name] = column
    return out
