"""compose_config: from Python, the very run config the command line composes.

`python -m sae_sweep l1_lambda=3 model=topk ...` and `compose_config(["l1_lambda=3", "model=topk", ...])`
go through the same Hydra composition (conf/config.yaml, its groups, the overrides, onto the schema in
config.py), so the defaults live in one place and `train(compose_config(overrides))` trains exactly the
run the command would, into the same run directory unless `out_dir` says otherwise.

A sweep holds one `Composer` (Hydra initialised once) and composes each trial's config through it;
`trial_config` then gives a trial its run directory and takes the sweep settings out. An unknown key,
group or option becomes one ConfigError line listing every allowed value, in a sweep and in a single
run alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from sae_sweep.config import register_configs
from sae_sweep.errors import ConfigError


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


_MISSING_OPTION = re.compile(r"Could not find '([^']+)/([^']+)'")
_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def _known_keys(dotted: str, overrides: list[str]) -> tuple[str, list[str]]:
    """(the node holding `dotted`, the keys that node has) in the config the other overrides compose
    (the `model.*` keys are the chosen architecture's)."""
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != dotted]
    try:
        cfg = compose(config_name="config", overrides=others)
    except HydraException:
        cfg = compose(config_name="config", overrides=[])
    *parents, _ = dotted.split(".")
    node: Any = cfg
    for part in parents:
        if not isinstance(node, DictConfig) or part not in node:
            return ".".join(parents), []
        node = node[part]
    keys = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    return ".".join(parents), [k for k in keys if not (not parents and k == "hydra")]


def _compose_error(overrides: list[str], err: HydraException) -> ConfigError:
    """Hydra's several-line message as our one line: the key or group, the value, every allowed one."""
    text = str(err)
    value_of = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[-1] for o in overrides}
    missing = _MISSING_OPTION.search(text)
    if missing:
        group, option = missing.groups()
        options = GlobalHydra.instance().config_loader().get_group_options(group)
        return ConfigError(group, option, "one of " + ", ".join(options))
    unknown = _UNKNOWN_KEY.search(text)
    if unknown:
        key = unknown.group(1)
        parent, keys = _known_keys(key, overrides)
        where = f"keys of {parent}" if parent else "top-level keys"
        return ConfigError(key, value_of.get(key), f"a known key ({where}: {', '.join(keys)})")
    cause = err.__cause__ or err.__context__
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    for override in overrides:  # name the override Hydra complains about, if it says which
        key = override.split("=", 1)[0].lstrip("+~")
        if override in text or f"'{key}'" in text:
            return ConfigError(
                key, value_of.get(key), f"a value of the key's type ({detail or text.strip()})"
            )
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return ConfigError(
        "override", " ".join(overrides), f"overrides Hydra can compose ({'; '.join(lines[:3])})"
    )


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


# Hydra flags that point composition elsewhere: the check below would compose the wrong config.
_OWN_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def check_overrides(argv: list[str]) -> str | None:
    """A single run's command line: None if its overrides compose, else our one-line error (Hydra's own
    is several lines and lists none of the allowed keys)."""
    if any(a.split("=", 1)[0] in _OWN_CONFIG_FLAGS for a in argv):
        return None
    # hydra.* keys configure Hydra's run, except the searchpath, which adds the user's config groups
    runs_hydra = [a for a in argv if a.startswith("hydra.") and not a.startswith("hydra.searchpath=")]
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and a not in runs_hydra]
    try:
        with Composer() as composer:
            composer.compose(overrides)
    except ConfigError as err:
        return f"sae_sweep: error: {err}"
    return None
