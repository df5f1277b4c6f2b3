"""Checkpoints: everything needed to continue a run bit-for-bit where it stopped (rundir.CHECKPOINT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_sweep import rundir


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomic and durable: a kill or power cut mid-write never leaves a torn checkpoint."""
    rundir.write_torch(run_dir / rundir.CHECKPOINT, state)


def read_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / rundir.CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def remove_checkpoint(run_dir: Path) -> None:
    (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
