"""The optimizer step's two passes over the weights: gradient clipping and Adam, with the same numbers as
torch's `clip_grad_norm_` and fused `Adam`, minus work those do for nothing here.

- `Adam`: torch's fused Adam copies a parameter that is not contiguous into a contiguous temporary every
  step. W_enc is stored transposed (it starts as W_dec^T, and the sparse path computes its gradient in
  that layout), so each step paid a copy of W_enc (~10 ms at d_in 768 x hidden 4096 on a 2-core CPU).
  Adam is elementwise: this one hands the fused kernel the contiguous transposes of such a parameter,
  its gradient and its moments instead, which is the same update.
- `clip_gradients`: clip_grad_norm_ multiplies every gradient by min(1, max_norm / norm), a pass over
  every weight even when the factor is 1. On CPU the norm is known without a device sync, so the pass
  runs only when it changes something.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def _transposed_layout(t: Any) -> bool:
    """Whether t is a 2-D tensor whose transpose (and not t) is contiguous: the same memory, C order."""
    return isinstance(t, Tensor) and t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


class Adam(torch.optim.Adam):
    """torch.optim.Adam whose update runs on contiguous views of transposed-layout tensors."""

    def _init_group(self, group: dict[str, Any], *lists: Any) -> Any:
        result = super()._init_group(group, *lists)  # pyright: ignore[reportCallIssue]
        # params, grads, moments (and step counts): index i of each list is parameter i
        aligned = [t for t in lists if isinstance(t, list) and t and len(t) == len(lists[0])]
        for i in range(len(lists[0])):
            matrices = [t for t in aligned if isinstance(t[i], Tensor) and t[i].dim() == 2]
            if matrices and all(_transposed_layout(t[i]) for t in matrices):
                for t in matrices:
                    t[i] = t[i].t()
        return result


def clip_gradients(params: Iterable[Tensor], max_norm: float) -> None:
    """clip_grad_norm_(params, max_norm), skipping its multiply by 1 on CPU."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if not grads or get_total_norm is None or grads[0].device.type != "cpu":
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    total_norm = get_total_norm(grads, foreach=True)
    # clip_grad_norm_'s own factor, before its clamp to 1: a factor >= 1 leaves every gradient as it is
    if bool(max_norm / (total_norm + 1e-6) >= 1):
        return
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm, foreach=True)
