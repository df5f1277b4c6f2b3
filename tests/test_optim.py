"""The trainer's Adam and clipping give torch's numbers exactly, with W_enc in its transposed layout."""

from __future__ import annotations

import pytest
import torch

from sae_sweep.train.optim import Adam, clip_gradients


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(48, 16, generator=g)
    return [
        torch.nn.Parameter(W_dec.t().clone()),  # W_enc's layout: [16, 48] with strides (1, 16)
        torch.nn.Parameter(W_dec.clone()),
        torch.nn.Parameter(torch.randn(48, generator=g)),
    ]


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))


def test_adam_on_a_transposed_parameter_is_torchs_fused_adam_bit_for_bit() -> None:
    ours, theirs = _params(0), _params(0)
    assert not ours[0].is_contiguous() and ours[0].t().is_contiguous()
    opt_ours = Adam(ours, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    opt_theirs = torch.optim.Adam(theirs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    for step in range(5):
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            _grads(params, step)
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        assert a.stride() == b.stride()  # the parameter keeps its layout
        assert torch.equal(a, b)
        assert torch.equal(opt_ours.state[a]["exp_avg_sq"], opt_theirs.state[b]["exp_avg_sq"])
    # the state is torch's own, so a checkpoint of either optimizer loads into the other
    opt_theirs.load_state_dict(opt_ours.state_dict())


@pytest.mark.parametrize("max_norm", [1e3, 1.0])  # far above the gradients' norm, and below it
def test_clip_gradients_is_clip_grad_norm(max_norm: float) -> None:
    ours, theirs = _params(1), _params(1)
    _grads(ours, 0)
    _grads(theirs, 0)
    before = _norm(ours)
    clip_gradients(ours, max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=True)
    for a, b in zip(ours, theirs, strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.equal(a.grad, b.grad)
    assert _norm(ours) == pytest.approx(min(max_norm, before), rel=1e-5)


def _norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.flatten() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))
