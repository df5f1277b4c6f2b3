"""Atomic checkpoints: everything needed to continue a run bit-for-bit where it stopped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so a kill mid-write never leaves a torn checkpoint."""
    path = run_dir / CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def read_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def remove_checkpoint(run_dir: Path) -> None:
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
