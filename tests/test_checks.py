"""checks: the shared validation helpers give one line naming key, value and what is allowed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from sae_sweep import checks
from sae_sweep.errors import ConfigError


def test_one_of_lists_every_allowed_value() -> None:
    checks.one_of("model", "relu", ("relu", "topk"))
    with pytest.raises(ConfigError) as err:
        checks.one_of("model", "nosuch", ("relu", "topk", "jumprelu"))
    assert str(err.value) == "config key 'model' = 'nosuch' is not allowed: one of relu, topk, jumprelu"


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, None])
def test_positive_refuses_what_is_not_a_positive_finite_number(value) -> None:
    with pytest.raises(ConfigError, match="'lr' .* a positive finite number"):
        checks.positive("lr", value)


def test_positive_takes_none_only_where_allowed() -> None:
    checks.positive("lr", None, allow_none=True)
    checks.positive("lr", 1e-9)


def test_fraction_bounds() -> None:
    checks.fraction("beta1", 0.0)
    checks.fraction("warmup", 1.0, upper_open=False)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        checks.fraction("beta1", 1.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        checks.fraction("warmup", -0.1, upper_open=False)


def test_cuda_is_refused_where_there_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available here"):
        checks.check_device("cuda", key="eval.lm.device")
    with pytest.raises(ConfigError, match="one of auto, cpu, cuda"):
        checks.check_device("gpu")
    assert checks.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert checks.resolve_device("auto") == torch.device("cuda")
    assert checks.resolve_device("cpu") == torch.device("cpu")


@dataclass
class _Documented:
    plain: int = 1  # a trailing comment
    # a comment above,
    # on two lines
    above: str = "x"
    bare: float = 0.5
    url: str = "a#b"  # the value's '#' is not the comment's


def test_field_docs_reads_trailing_and_preceding_comments() -> None:
    assert checks.field_docs(_Documented) == {
        "plain": "a trailing comment",
        "above": "a comment above, on two lines",
        "bare": "",
        "url": "the value's '#' is not the comment's",
    }
