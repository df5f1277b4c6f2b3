"""SAE architectures behind one interface (`SAE` in base.py), their registry, a builder from config, and
the loader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from sae_sweep import rundir
from sae_sweep.errors import ConfigError, DataError
from sae_sweep.models.base import SAE, ModelConfig, SAEOutput
from sae_sweep.models.kernels import resolve_kernels
from sae_sweep.models.registry import (
    architecture,
    architectures,
    model_config,
    register_architecture,
    resolve_model_config,
)

__all__ = [
    "SAE",
    "SAEOutput",
    "ModelConfig",
    "architecture",
    "architectures",
    "build_sae",
    "load_sae",
    "model_config",
    "register_architecture",
    "resolve_model_config",
    "save_sae",
]

FORMAT_VERSION = "1"


def build_sae(
    model_cfg: Any,
    d_in: int,
    hidden: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> SAE:
    """The architecture named by model_cfg.name, initialised as its class says; `device` (where it will
    train) decides what `model.kernels=auto` runs, for architectures with that key."""
    cfg = resolve_model_config(model_cfg)
    if hasattr(cfg, "kernels"):
        cfg = dataclasses.replace(cfg, kernels=resolve_kernels(cfg.kernels, device))  # type: ignore[call-arg]
    return architecture(cfg.name).from_config(cfg, d_in, hidden, generator)


def save_sae(sae: SAE, path: Path, scale_factor: float, raw_mean_norm: float) -> None:
    """Write sae.safetensors in the plain form that applies to raw activations: the input scale factor
    is folded into the weights, so `load_sae(path).encode(x_raw)` needs no scaling."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "architecture": sae.architecture,
        "d_in": str(sae.d_in),
        "hidden": str(sae.hidden),
        "scale_factor": repr(float(scale_factor)),
        "raw_mean_norm": repr(float(raw_mean_norm)),
        "hyperparameters": json.dumps(sae.hyperparameters()),
    }
    metadata.update({k: str(v) for k, v in sae.hyperparameters().items()})
    rundir.write_bytes(path, safetensors_bytes(sae.plain_tensors(scale_factor), metadata=metadata))


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """A ready model from a run directory or an sae.safetensors file; it applies to raw activations."""
    path = Path(path)
    if path.is_dir():
        path = path / rundir.SAE
    if not path.is_file():
        raise DataError(path, "no such SAE file (expected a run directory holding sae.safetensors)")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    if "architecture" not in metadata:
        raise DataError(path, "not an sae_sweep SAE file (no 'architecture' in its metadata)")
    hyper = json.loads(metadata.get("hyperparameters", "{}"))
    d_in, hidden = int(metadata["d_in"]), int(metadata["hidden"])
    try:
        cls = architecture(metadata["architecture"])
    except ConfigError as err:
        raise DataError(path, f"holds an architecture not registered here ({err})") from None

    # Training-only settings (AuxK, init) don't matter for a loaded model: the class's defaults do.
    keys = {f.name for f in dataclasses.fields(cls.config_class)}
    cfg = cls.config_class(**{k: v for k, v in hyper.items() if k in keys})
    sae = cls.from_config(cfg, d_in, hidden)
    sae.load_plain(tensors)
    sae.metadata = metadata  # type: ignore[attr-defined]
    return sae.to(device).eval()
