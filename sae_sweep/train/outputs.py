"""What a run leaves in its directory when it ends (file names: rundir).

Finished: sae.safetensors (scale folded in), curves.csv, density.json (per-latent density, its histogram
and the latent summary), metrics.json. Stopped early (pruned, diverged, collapsed during training):
metrics.json with its status and reason, and curves.csv; no SAE. Either way the checkpoint goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_sweep import rundir
from sae_sweep.errors import RunStopped
from sae_sweep.measures import density_histogram
from sae_sweep.models import SAE, save_sae
from sae_sweep.train.checkpoint import remove_checkpoint


def write_finished(
    run_dir: Path,
    sae: SAE,
    scale_factor: float,
    raw_mean_norm: float,
    curves: list[dict[str, float]],
    density: torch.Tensor,
    latents: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """A finished run's outputs; metrics.json last, since its presence marks the run done."""
    save_sae(sae, run_dir / rundir.SAE, scale_factor, raw_mean_norm)
    rundir.write_csv(run_dir / rundir.CURVES, curves)
    hist = density_histogram(density)
    rundir.write_json(run_dir / rundir.DENSITY, {"density": density.tolist(), "histogram": hist, **latents})
    rundir.write_json(run_dir / rundir.METRICS, metrics)
    remove_checkpoint(run_dir)


def write_stopped(run_dir: Path, curves: list[dict[str, float]], err: RunStopped, tokens: int) -> None:
    """A run that stopped early: its last curves row with the status and reason; no SAE is written."""
    last = curves[-1] if curves else {}
    metrics = {**last, "status": err.status, "reason": err.reason, "tokens": tokens}
    rundir.write_json(run_dir / rundir.METRICS, metrics)
    rundir.write_csv(run_dir / rundir.CURVES, curves)
    remove_checkpoint(run_dir)
