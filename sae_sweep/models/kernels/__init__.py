"""Kernels of the TopK family's sparse training path (`model.kernels`): torch ops or Triton kernels.

- torch:  embedding_bag and a sparse COO product (sparse.py); runs everywhere.
- triton: the kernels in triton_ops.py; CUDA, or CPU tensors under TRITON_INTERPRET=1 (the tests).
- auto:   Triton on CUDA where a GPU measurement recorded it faster (TRITON_FASTER_ON_CUDA), else torch.

Both compute the same values and gradients (tests hold them to it); only speed differs.
"""

from __future__ import annotations

from sae_sweep.models.kernels.choice import (
    TRITON_FASTER_ON_CUDA,
    interpreting,
    kernels_problem,
    resolve_kernels,
    triton_available,
)
from sae_sweep.models.kernels.sparse import (
    Code,
    Selection,
    batch_top_values,
    batch_topk_code,
    fired,
    sparse_decode,
    sparse_decode_prefixes,
    sparse_encode,
    topk_code,
    transposed_product,
)

__all__ = [
    "TRITON_FASTER_ON_CUDA",
    "Code",
    "Selection",
    "batch_top_values",
    "batch_topk_code",
    "fired",
    "interpreting",
    "kernels_problem",
    "resolve_kernels",
    "sparse_decode",
    "sparse_decode_prefixes",
    "sparse_encode",
    "topk_code",
    "transposed_product",
    "triton_available",
]
