"""Schedules: lr warms up, holds and decays linearly; the sparsity coefficient warms up and holds."""

from __future__ import annotations

import pytest

from sae_sweep.train.schedule import lr_multiplier, sparsity_coefficient


def test_lr_rises_holds_and_decays_over_the_given_shares_of_steps() -> None:
    total = 100  # warm-up 10 steps, decay over the last 20
    lr = [lr_multiplier(s, total, 0.1, 0.2) for s in range(total)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # the 10th step is at full lr
    assert lr[10:80] == [1.0] * 70
    assert lr[80:] == pytest.approx([(total - s) / 20 for s in range(80, total)])
    assert lr[-1] == pytest.approx(1 / 20)  # the last step still moves the weights


def test_no_warmup_or_decay_is_a_constant_lr() -> None:
    assert {lr_multiplier(s, 50, 0.0, 0.0) for s in range(50)} == {1.0}
    # shares too small for a whole step mean none
    assert {lr_multiplier(s, 5, 0.01, 0.01) for s in range(5)} == {1.0}


def test_sparsity_coefficient_reaches_l1_lambda_at_the_end_of_its_warmup() -> None:
    coefs = [sparsity_coefficient(s, 200, 5.0, 0.05) for s in range(200)]  # 10 warm-up steps
    assert coefs[0] == pytest.approx(0.5) and coefs[9] == pytest.approx(5.0)
    assert all(a < b for a, b in zip(coefs[:10], coefs[1:10], strict=False))
    assert set(coefs[10:]) == {5.0}
    assert sparsity_coefficient(0, 200, 5.0, 0.0) == 5.0
