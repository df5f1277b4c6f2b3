"""SAE architectures behind one interface (`SAE` in base.py), a builder from config, and the loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from sae_sweep import rundir
from sae_sweep.config import DEFAULT_DEC_INIT_NORM, ModelConfig
from sae_sweep.errors import DataError
from sae_sweep.models.base import SAE, SAEOutput
from sae_sweep.models.batchtopk import BatchTopKSAE
from sae_sweep.models.jumprelu import JumpReLUSAE
from sae_sweep.models.kernels import resolve_kernels
from sae_sweep.models.relu import ReluSAE
from sae_sweep.models.topk import TopKSAE

__all__ = ["SAE", "SAEOutput", "build_sae", "save_sae", "load_sae"]

FORMAT_VERSION = "1"


def build_sae(
    model_cfg: Any,
    d_in: int,
    hidden: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> SAE:
    """The architecture named by model_cfg.name, initialised as its recipe says;
    `device` (where it will train) decides what `model.kernels=auto` runs."""
    name = model_cfg.name
    dec_init_norm = model_cfg.dec_init_norm or DEFAULT_DEC_INIT_NORM.get(name, 1.0)
    if name == "relu":
        return ReluSAE(d_in, hidden, dec_init_norm, generator)
    if name == "jumprelu":
        return JumpReLUSAE(
            d_in, hidden, dec_init_norm, model_cfg.jump_bandwidth, model_cfg.jump_threshold_init, generator
        )
    topk_args = (d_in, hidden, model_cfg.k, model_cfg.aux_k, model_cfg.aux_k_coef, model_cfg.aux_dead_tokens)
    sparse = {
        "sparse_kernels": model_cfg.sparse_kernels,
        "kernels": resolve_kernels(getattr(model_cfg, "kernels", "auto"), device),
    }
    if name == "topk":
        return TopKSAE(*topk_args, generator=generator, **sparse)
    if name == "batchtopk":
        return BatchTopKSAE(
            *topk_args, generator=generator, threshold_momentum=model_cfg.threshold_momentum, **sparse
        )
    raise ValueError(f"unknown architecture {name!r}")


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

    # Training-only settings (AuxK, init) don't matter for a loaded model.
    sae = build_sae(ModelConfig(name=metadata["architecture"], k=hyper.get("k")), d_in, hidden)
    sae.load_plain(tensors)
    sae.metadata = metadata  # type: ignore[attr-defined]
    return sae.to(device).eval()
