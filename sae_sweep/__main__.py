"""CLI: `python -m sae_sweep [key=value ...]` trains one SAE (see `--help`); `-m` runs a sweep."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import hydra
from omegaconf import DictConfig

from sae_sweep.config import register_configs
from sae_sweep.errors import RunStopped, SaeSweepError
from sae_sweep.rundir import shown_path

log = logging.getLogger("sae_sweep")


def summary_line(metrics: Mapping[str, Any]) -> str:
    """The run's headline metrics on one line ("completed: mse=... explained_variance=... ...")."""
    parts = [f"{metrics.get('status', '?')}:"]
    for key in ("mse", "explained_variance", "l0", "dead_frac", "mcc"):
        if metrics.get(key) is not None:
            parts.append(f"{key}={metrics[key]:.4g}")
    return " ".join(parts)


@hydra.main(version_base="1.3", config_path="pkg://sae_sweep.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from sae_sweep.train.trainer import train

    try:
        metrics = train(cfg)
    except RunStopped as err:
        print(f"sae_sweep: run stopped early, {err} (run directory: {cfg.out_dir})", file=sys.stderr)
        sys.exit(1)
    except SaeSweepError as err:
        print(f"sae_sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a file the run cannot write (full disk, permissions): nothing is lost
        where = f"'{err.filename}'" if err.filename else "a file of the run"
        print(
            f"sae_sweep: error: {where}: {err.strerror or err}; once fixed, the same command resumes the "
            "run from its last checkpoint",
            file=sys.stderr,
        )
        sys.exit(2)
    print(f"run directory: {shown_path(cfg.out_dir)}")
    print(summary_line(metrics))


if __name__ == "__main__":
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        # Sweeps use our Optuna driver, not Hydra's BasicSweeper (see sae_sweep/sweep).
        from sae_sweep.sweep.driver import main as sweep_main

        sys.exit(sweep_main(sys.argv[1:]))
    from sae_sweep.compose import check_overrides

    problem = check_overrides(sys.argv[1:])  # unknown keys, groups, options: one line, not Hydra's
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    try:
        register_configs()  # loads the architectures of installed packages (entry points)
    except SaeSweepError as err:
        print(f"sae_sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
