"""compose_config: from Python, the very run config the command line composes.

`python -m sae_sweep l1_lambda=3 model=topk ...` and `compose_config(["l1_lambda=3", "model=topk", ...])`
go through the same Hydra composition (conf/config.yaml, its groups, the overrides, onto the schema in
config.py), so the defaults live in one place and `train(compose_config(overrides))` trains exactly the
run the command would, into the same run directory unless `out_dir` says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from sae_sweep.sweep.compose import Composer


def compose_config(overrides: Sequence[str] = (), *, out_dir: str | Path | None = None) -> DictConfig:
    """The config `python -m sae_sweep OVERRIDES...` trains (a DictConfig with the `Config` schema).

    out_dir: the run directory; None = the command's own (hydra.run.dir from the overrides, else
    outputs/runs/<the overrides> under the current directory), as an absolute path like the CLI's.
    Bad keys, groups or values raise ConfigError with one line, as the command prints them.
    """
    overrides = list(overrides)
    with Composer() as composer:
        cfg = composer.compose(overrides)
        if out_dir is None:
            out_dir = _run_dir(overrides)
    with open_dict(cfg):
        cfg.out_dir = os.path.abspath(out_dir)
    return cfg


def _run_dir(overrides: list[str]) -> str:
    """hydra.run.dir as the command resolves it (it reads the overrides through Hydra's own config)."""
    full = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(full)
    try:
        return str(full.hydra.run.dir)
    finally:
        hydra_config.cfg = previous
