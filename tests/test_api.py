"""The public API: `compose_config` + `train` from Python give exactly the run the command line gives."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from omegaconf import OmegaConf

import sae_sweep
from sae_sweep.errors import ConfigError

SMALL = [
    "data.d_in=32",
    "data.n_features=96",
    "data.n_tokens=120000",
    "data.true_l0=3.0",
    "data.chunk_tokens=1024",
    "batch_size=512",
    "hidden_dim=64",
    "tokens=30000",
    "device=cpu",
    "train.progress=false",
    "train.log_every_tokens=8192",
]
WALL_CLOCK = ("tokens_per_s", "train_seconds")  # the only values that may differ between two runs


def _without(d: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def test_compose_config_and_train_give_the_cli_run(tmp_path, data_root, monkeypatch):
    overrides = [*SMALL, f"data.path={data_root}", "l1_lambda=3"]
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    shown = res.stdout.split("run directory: ")[1].splitlines()[0]
    assert not Path(shown).is_absolute()  # printed as typed: relative to the working directory
    cli_dir = tmp_path / shown

    monkeypatch.chdir(tmp_path)
    cfg = sae_sweep.compose_config(overrides)
    assert cfg.out_dir == str(cli_dir)  # the command's own run directory, absolute

    py_dir = tmp_path / "from_python"
    metrics = sae_sweep.train(sae_sweep.compose_config(overrides, out_dir=py_dir))
    cli_metrics = json.loads((cli_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert _without(metrics, WALL_CLOCK) == _without(cli_metrics, WALL_CLOCK)
    saved = [cast(dict, OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))) for d in (cli_dir, py_dir)]
    assert saved[1]["out_dir"] == str(py_dir)
    assert _without(saved[0], ["out_dir"]) == _without(saved[1], ["out_dir"])


def test_compose_config_takes_hydra_run_dir_and_refuses_bad_input_in_one_line(tmp_path):
    cfg = sae_sweep.compose_config(["model=topk", "model.k=8", f"hydra.run.dir={tmp_path / 'r'}"])
    assert (cfg.model.name, cfg.model.k, cfg.out_dir) == ("topk", 8, str(tmp_path / "r"))
    with pytest.raises(ConfigError) as err:
        sae_sweep.compose_config(["model=nosuch"])
    assert "model" in str(err.value) and "\n" not in str(err.value)


def test_the_public_names_are_there_and_the_report_loads_only_when_asked():
    code = (
        "import sys, sae_sweep\n"
        "assert 'sae_sweep.report' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "from sae_sweep import collect, write_report, train, train_pack, load_sae, evaluate_sae\n"
        "assert callable(collect) and callable(write_report) and 'sae_sweep.report' in sys.modules\n"
        "assert [n for n in sae_sweep.__all__ if not hasattr(sae_sweep, n)] == []\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
