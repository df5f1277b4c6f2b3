"""Activation data: a folder of shards (or generated ground truth) as a split, bounded-memory stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_sweep.data.shards import ActivationDataset
from sae_sweep.errors import ConfigError

__all__ = ["ActivationDataset", "open_dataset"]


def open_dataset(data_cfg: Any, *, progress: bool = True) -> ActivationDataset:
    """Open the data a config names (DataConfig or its DictConfig); data.shuffle_seed fixes split, order."""
    truth = None
    if data_cfg.kind == "synthetic":
        from sae_sweep.data.synthetic import ensure_synthetic, load_ground_truth  # generator only when used

        folder = ensure_synthetic(data_cfg, progress=progress)
        truth = load_ground_truth(folder)
    elif data_cfg.kind == "shards":
        if not data_cfg.path:
            raise ConfigError("data.path", None, "a folder of activation shards (.npy, .pt, .safetensors)")
        folder = Path(data_cfg.path)
    else:
        raise ConfigError("data.kind", data_cfg.kind, "synthetic or shards")
    return ActivationDataset(
        folder,
        seed=data_cfg.shuffle_seed,
        chunk_tokens=data_cfg.chunk_tokens,
        test_fraction=data_cfg.test_fraction,
        buffer_mb=data_cfg.buffer_mb,
        ground_truth=truth,
    )
