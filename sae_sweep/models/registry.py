"""Architecture names -> SAE classes, and from them the `model` config group.

Each class declares how it is trained (see `sae_sweep.models.base`); `register_architecture(cls)` makes
`model=<cls.architecture>` and its `model.*` keys (its `config_class` fields) available to the CLI,
sweeps and `build_sae` / `load_sae`. The built-in architectures are in `BUILTIN`; an architecture of
your own is one module with its class, registered either

- in Python, by calling `register_architecture(MySAE)` before composing or training, or
- for the command line (and the sweep's worker processes, which are separate processes), by an entry
  point of your installed package in the group `sae_sweep.architectures`, naming the class or a module
  that registers its classes on import:

      [project.entry-points."sae_sweep.architectures"]
      my_arch = "my_package.my_arch:MySAE"

Entry points are loaded the first time the registry is asked for an architecture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sae_sweep.errors import ConfigError
from sae_sweep.models.base import FAMILIES, SAE, ModelConfig
from sae_sweep.models.batchtopk import BatchTopKSAE
from sae_sweep.models.jumprelu import JumpReLUSAE
from sae_sweep.models.matryoshka import MatryoshkaBatchTopKSAE
from sae_sweep.models.relu import ReluSAE
from sae_sweep.models.topk import TopKSAE

ENTRY_POINT_GROUP = "sae_sweep.architectures"
BUILTIN: tuple[type[SAE], ...] = (ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE)

_REGISTRY: dict[str, type[SAE]] = {}
_plugins_loaded = False


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Make `cls` available as `model=<cls.architecture>`; returns cls (usable as a class decorator).

    Registering the same class again does nothing; another class under a taken name is refused.
    """
    name = getattr(cls, "architecture", None)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if not (isinstance(cls, type) and issubclass(cls, SAE)) or not isinstance(name, str) or not name:
        raise TypeError(f"{where}: an architecture is an SAE subclass with a class attribute `architecture`")
    config_class = getattr(cls, "config_class", None)
    if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, ModelConfig)):  # type: ignore[arg-type]
        raise TypeError(f"{where}: config_class must be a dataclass subclassing ModelConfig")
    if config_class().name != name:
        raise TypeError(f"{where}: config_class's `name` must default to {name!r}")
    if getattr(cls, "family", None) not in FAMILIES:
        raise TypeError(f"{where}: family must be one of {', '.join(FAMILIES)}")
    if cls.family == "penalty" and (cls.default_coef is None or cls.sparsity_metric is None):
        raise TypeError(f"{where}: a penalty architecture declares default_coef and sparsity_metric")
    known = _REGISTRY.get(name)
    if known is cls:
        return cls
    if known is not None:
        raise ValueError(
            f"architecture {name!r} is already registered by {known.__module__}.{known.__qualname__}"
        )
    _REGISTRY[name] = cls
    # The `model` group of the config: `model=NAME` selects this schema, `model.KEY=...` its fields.
    ConfigStore.instance().store(group="model", name=name, node=config_class)
    return cls


def load_plugins() -> None:
    """Register the architectures of installed packages' `sae_sweep.architectures` entry points (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure of a plugin: say which one
            raise ConfigError(
                f"entry point {ENTRY_POINT_GROUP}:{ep.name}",
                ep.value,
                f"an importable module or class ({err})",
            ) from None
        if isinstance(loaded, type):
            register_architecture(loaded)


def architectures() -> dict[str, type[SAE]]:
    """Every registered architecture by name, built-ins first."""
    load_plugins()
    return dict(_REGISTRY)


def architecture(name: str) -> type[SAE]:
    """The class of architecture `name`; ConfigError (key `model`) listing the choices otherwise."""
    known = architectures()
    if name not in known:
        raise ConfigError("model", name, "one of " + ", ".join(known))
    return known[name]


def config_fields(config_class: type[ModelConfig]) -> list[tuple[str, type]]:
    """(key, the class in config_class's MRO that defines it) for each `model.*` key, in field order."""
    out = []
    for f in dataclasses.fields(config_class):
        owner = next(c for c in config_class.__mro__ if f.name in c.__dict__.get("__annotations__", {}))
        out.append((f.name, owner))
    return out


def model_config(name: str, **values: Any) -> Any:  # the architecture's own config class
    """The config of architecture `name` with `values` set; a key this architecture lacks is refused
    unless its value is None (so `model_config(name, k=None)` suits every architecture)."""
    return resolve_model_config({"name": name, **values}, drop_none=True)


def resolve_model_config(model_cfg: Any, *, drop_none: bool = False) -> ModelConfig:
    """`model_cfg` (a DictConfig, dataclass or mapping with `name`) as an instance of its architecture's
    config class, the class's defaults filling what it leaves out. ConfigError names a key it lacks."""
    if isinstance(model_cfg, DictConfig):
        values = {str(k): v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items()}  # type: ignore[union-attr]
    elif dataclasses.is_dataclass(model_cfg) and not isinstance(model_cfg, type):
        values = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
    elif isinstance(model_cfg, Mapping):
        values = {str(k): v for k, v in model_cfg.items()}
    else:
        raise TypeError(f"not a model config: {model_cfg!r}")
    cls = architecture(str(values.get("name", ModelConfig.name)))
    if isinstance(model_cfg, ModelConfig) and type(model_cfg) is cls.config_class:
        return model_cfg
    keys = [name for name, _ in config_fields(cls.config_class)]
    for key, value in list(values.items()):
        if key not in keys:
            if drop_none and value is None:
                del values[key]
                continue
            raise ConfigError(f"model.{key}", value, f"a key of model={cls.architecture}: {', '.join(keys)}")
    return cls.config_class(**values)


for _cls in BUILTIN:
    register_architecture(_cls)
