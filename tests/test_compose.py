"""Composing trial configs: unknown keys, groups and options give our one line listing every allowed
value, in a sweep and in a single run alike."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sae_sweep.compose import Composer
from sae_sweep.errors import ConfigError
from sae_sweep.models.registry import architectures
from sae_sweep.sweep import driver

CASES = {
    "model=nosuch": ("'model' = 'nosuch'", ["batchtopk", "jumprelu", "relu", "topk"]),
    "sweep=nosuch": ("'sweep' = 'nosuch'", ["auto", "grid", "nsga2", "random", "tpe"]),
    "foo=1": ("'foo' = '1'", ["batch_size", "hidden_dim", "l1_lambda", "lr", "model", "train"]),
    "train.foo=1": ("'train.foo' = '1'", ["checkpoint_every_s", "dead_window", "log_every_tokens"]),
    "lr=abc": ("'lr' = 'abc'", ["could not be converted to Float"]),
}


@pytest.mark.parametrize("override", sorted(CASES))
def test_composer_errors_name_the_key_and_every_allowed_value(override):
    named, allowed = CASES[override]
    with Composer() as composer, pytest.raises(ConfigError) as err:
        composer.compose([override])
    message = str(err.value)
    assert "\n" not in message and named in message and all(a in message for a in allowed), message


def test_a_sweep_over_an_unknown_option_lists_them_all(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert driver.run(["model=relu,nosuch", f"hydra.sweep.dir={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip()
    every_architecture = ", ".join(sorted(architectures()))  # every registered one, not only the first
    assert err.count("\n") == 0 and f"one of {every_architecture}" in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("override", ["model=nosuch", "foo=1"])
def test_a_single_run_with_an_unknown_key_or_option_is_one_line(tmp_path, override):
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    named, allowed = CASES[override]
    assert res.returncode == 2 and res.stdout == ""
    line = res.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("sae_sweep: error:") and named in line, res.stderr
    assert all(a in line for a in allowed)
    assert not (tmp_path / "outputs").exists()  # nothing started
