"""Checkpoints: everything needed to continue a run bit-for-bit where it stopped (rundir.CHECKPOINT).

A checkpoint that cannot be read (truncated, overwritten, from a foreign program) is set aside as
`checkpoint.pt.corrupt` (then `.corrupt.1`, ...) with a warning naming both files, and the run starts over:
one bad file must not wedge a run or a sweep that re-runs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_sweep import rundir

log = logging.getLogger("sae_sweep")

# What a checkpoint holds (Trainer.checkpoint writes them; Trainer._restore reads them).
KEYS = ("config", "model", "optimizer", "dead", "state", "scale_factor", "raw_mean_norm")


@dataclass
class RunState:
    """What the loop carries and checkpoints besides model and optimizer."""

    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    # running sums (loss, mse, l0) and step count since the last curves row
    interval_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    interval_steps: int = 0
    curves: list[dict[str, float]] = field(default_factory=list)


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomic and durable: a kill or power cut mid-write never leaves a torn checkpoint."""
    rundir.write_torch(run_dir / rundir.CHECKPOINT, _own(state))


def _own(obj: Any) -> Any:
    """obj with every tensor that views a larger storage copied out: a stacked member's weights and
    Adam state are slices of its stack (train/stack.py), and torch.save writes a view's whole storage."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.nbytes else obj
    if isinstance(obj, dict):
        return {k: _own(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_own(v) for v in obj)
    return obj


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + ".corrupt")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt.{n}")
    path.rename(target)
    return target


def read_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run's checkpoint, or None when there is none to resume from (none, or unreadable: set aside)."""
    path = run_dir / rundir.CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a checkpoint")
        missing = [k for k in KEYS if k not in state]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ValueError, ...
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        aside = _set_aside(path)
        log.warning(
            "checkpoint %s is unreadable (%s); set aside as %s, the run starts over", path, why, aside
        )
        return None
    return state


def remove_checkpoint(run_dir: Path) -> None:
    (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)
