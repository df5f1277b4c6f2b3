"""Which kernels `model.kernels` runs: a leaf (config validation and the models both import it)."""

from __future__ import annotations

import importlib.util
import os

import torch

# Set to True once benchmarks/README.md records `python -m benchmarks.gpu` showing Triton faster than
# the torch ops on a GPU; until then `auto` means torch everywhere (no GPU has measured it yet).
TRITON_FASTER_ON_CUDA = False


def interpreting() -> bool:
    """Whether Triton interprets kernels on CPU tensors (TRITON_INTERPRET=1), as the tests run them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_kernels(choice: str, device: torch.device | str) -> str:
    """ "torch" or "triton" for a `model.kernels` value on a device."""
    if choice == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return "triton" if on_cuda and TRITON_FASTER_ON_CUDA and triton_available() else "torch"
    return choice


def kernels_problem(choice: str, device: torch.device | str) -> str | None:
    """Why `model.kernels=choice` cannot run on `device` (what would be allowed), or None."""
    if choice != "triton":
        return None
    if not triton_available():
        return "auto or torch: triton is not installed (pip install triton)"
    if torch.device(device).type != "cuda" and not interpreting():
        return (
            "auto or torch on CPU: Triton kernels need CUDA, or TRITON_INTERPRET=1 to interpret them on CPU"
        )
    return None
