"""Trial configs from overrides with Hydra's compose API: the same composition a single run gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from sae_sweep.config import register_configs
from sae_sweep.errors import ConfigError


class Composer:
    """Holds Hydra initialised on sae_sweep.conf for the life of a sweep process (compose is then ~50 ms)."""

    def __init__(self) -> None:
        register_configs()
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        self._context = initialize_config_module(config_module="sae_sweep.conf", version_base="1.3")
        self._context.__enter__()

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compose(self, overrides: list[str]) -> DictConfig:
        try:
            return compose(config_name="config", overrides=overrides)
        except HydraException as err:
            raise _compose_error(overrides, err) from None

    def group_options(self, group: str) -> list[str]:
        return GlobalHydra.instance().config_loader().get_group_options(group)


def _compose_error(overrides: list[str], err: HydraException) -> ConfigError:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = "; ".join(lines[:3])
    for override in overrides:  # name the override Hydra complains about, if it says which
        key = override.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in message or f"'{key.split('.')[0]}'" in message:
            return ConfigError(
                key, override.split("=", 1)[-1], f"a key and value Hydra can compose ({message})"
            )
    return ConfigError("override", " ".join(overrides), f"overrides Hydra can compose ({message})")


def trial_config(cfg: DictConfig, out_dir: Path | str, progress: bool | None = None) -> DictConfig:
    """The training config of one trial: its run directory set and the sweep settings taken out, so a
    trial's config.yaml is a plain run's and a resumed trial compares equal whatever `sweep.*` says."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.out_dir = str(out_dir)
        del cfg["sweep"]
        if progress is not None:
            cfg.train.progress = progress
    return cfg


def sweep_settings(cfg: DictConfig) -> Any:
    """The `sweep` node as a plain object (SweepConfig fields)."""
    return OmegaConf.to_object(cfg.sweep)
