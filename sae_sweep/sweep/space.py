"""Hydra override strings -> the overrides every trial shares and the search space over the rest.

Comma lists and `choice(...)` (and `glob(...)` over a config group) are categorical dimensions; a space
made only of those is a grid, run point by point. `interval(...)` (`tag(log, interval(...))`,
`tag(int, ...)`) and `range(...)` are numeric dimensions and make the search Bayesian; any lists beside
them become categorical parameters of that search, so `l1_lambda=0,1e-3` stays legal next to a log range.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    Glob,
    IntervalSweep,
    Override,
    Quote,
    QuotedString,
    RangeSweep,
)
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.nodes import IntegerNode
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from sae_sweep.config import Config
from sae_sweep.errors import ConfigError
from sae_sweep.rundir import RESUME_IGNORED_KEYS

Primitive = None | bool | int | float | str
# The only hydra.* key a sweep reads; other hydra.* keys configure Hydra's own runs and are ignored.
SWEEP_DIR_KEY = "hydra.sweep.dir"
SEARCHPATH_KEY = "hydra.searchpath"  # passed on to every trial's composition (README: your own groups)
# Keys that may change when a sweep is resumed, so not part of what defines the experiment: how it runs
# (sweep.*; the driver adds the resolved sampler and objectives itself) and what a resumed run ignores.
RUNTIME_KEYS = ("sweep", *RESUME_IGNORED_KEYS)
# Grids with more points than this are checked value by value rather than point by point.
MAX_POINTS_CHECKED = 256


@dataclass(frozen=True)
class Dimension:
    """One swept key. `name` is the key as typed on the command line, also the Optuna parameter name."""

    name: str
    kind: str  # categorical | float | int
    choices: tuple[Primitive, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def distribution(self) -> BaseDistribution:
        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def probe_values(self) -> list[Primitive]:
        """Values checked against the config before any work: every choice, or both ends."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        """Exact and readable: `0,1e-09,5`, `log float [1e-05, 0.01]`, `int [64, 256] step 64`."""
        if self.kind == "categorical":
            return ",".join(format_value(v) for v in self.choices)
        scale = "log " if self.log else ""
        step = f" step {self.step!r}" if self.step else ""
        return f"{scale}{self.kind} [{self.low!r}, {self.high!r}]{step}"


@dataclass
class SearchSpace:
    fixed: list[str] = field(default_factory=list)  # overrides every trial gets, as typed
    dims: list[Dimension] = field(default_factory=list)
    sweep_dir: str | None = None  # hydra.sweep.dir, if given
    ignored: list[str] = field(default_factory=list)  # hydra.* overrides a sweep does not use

    @property
    def is_grid(self) -> bool:
        return all(d.kind == "categorical" for d in self.dims)

    def grid(self) -> list[dict[str, Primitive]]:
        """Every point of the product: keys in name order (the last varies fastest), values as typed."""
        names = [d.name for d in self.dims]
        product = itertools.product(*(d.choices for d in self.dims))
        return [dict(zip(names, values, strict=True)) for values in product]

    def grid_size(self) -> int:
        return math.prod(len(d.choices) for d in self.dims)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        return [*self.fixed, *(f"{d.name}={format_value(params[d.name])}" for d in self.dims)]

    def probe_points(self) -> Iterator[dict[str, Primitive]]:
        """Points whose configs are validated before any training: the whole grid when it is small,
        else each value of each key with the other keys at their first value."""
        if self.is_grid and self.grid_size() <= MAX_POINTS_CHECKED:
            yield from self.grid()
            return
        base = {d.name: d.probe_values()[0] for d in self.dims}
        yield base
        for d in self.dims:
            for value in d.probe_values()[1:]:
                yield {**base, d.name: value}

    def identity(self) -> dict[str, Any]:
        """What defines the experiment: a study created by a different identity is a different sweep."""
        fixed = sorted(o for o in self.fixed if not _is_runtime_key(o.split("=", 1)[0].lstrip("+~")))
        return {"fixed overrides": fixed, "search space": {d.name: d.describe() for d in self.dims}}


def _is_runtime_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)


def format_value(value: Any) -> str:
    """A value in override syntax that Hydra parses back to the same value and type."""
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: 1e-09, 0.001, inf, nan
    if isinstance(value, str):
        plain = Override._get_value_element_as_str(value)
        if _parses_to(plain, value):
            return plain
        return QuotedString(text=value, quote=Quote.single).with_quotes()
    return Override._get_value_element_as_str(value)


def _parses_to(text: str, value: Any) -> bool:
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}").value()
    except HydraException:
        return False
    return type(parsed) is type(value) and parsed == value


def _plain(value: Any, key: str) -> Primitive:
    if isinstance(value, QuotedString):
        return value.text
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(
        key,
        format_value(value),
        "numbers, strings, true/false or null in a sweep (list- and dict-valued keys cannot be swept)",
    )


def _int_key(key: str) -> bool:
    """Whether the config schema types `key` as an integer (then interval(...) samples integers)."""
    node: Any = OmegaConf.structured(Config)
    for part in key.split("."):
        try:
            node = node._get_node(part)
        except Exception:
            return False
        if node is None:
            return False
    return isinstance(node, IntegerNode)


def _choice_dim(key: str, values: list[Any]) -> Dimension:
    choices: list[Primitive] = []
    seen: set[tuple[type, Primitive]] = set()
    for raw in values:
        value = _plain(raw, key)
        if (type(value), value) not in seen:  # every point exactly once, even if typed twice
            seen.add((type(value), value))
            choices.append(value)
    return Dimension(key, "categorical", tuple(choices))


def _range_dim(key: str, sweep: RangeSweep) -> Dimension:
    values = list(sweep.range())
    text = f"range({sweep.start},{sweep.stop},{sweep.step})"
    if not values:
        raise ConfigError(key, text, "a range with at least one value")
    log = "log" in sweep.tags
    low, high, step = min(values), max(values), abs(sweep.step)
    if all(isinstance(v, int) for v in values):
        if log and (step != 1 or low <= 0):
            raise ConfigError(key, text, "a log range of positive integers with step 1")
        return Dimension(key, "int", low=low, high=high, log=log, step=None if log else step)
    if log:
        raise ConfigError(key, text, "an integer range with tag(log, ...) (float ranges are linear)")
    # Optuna wants high - low to be a multiple of step: use the last value the range reaches.
    return Dimension(
        key, "float", low=float(low), high=float(low + step * (len(values) - 1)), step=float(step)
    )


def _interval_dim(key: str, sweep: IntervalSweep) -> Dimension:
    low, high = sweep.start, sweep.end
    log = "log" in sweep.tags
    text = f"{'tag(log, ' if log else ''}interval({low:g},{high:g}){')' if log else ''}"
    if low is None or high is None or not low < high:
        raise ConfigError(key, text, "an interval whose lower end is below its upper end")
    if log and low <= 0:
        raise ConfigError(
            key,
            text,
            "a log interval with a positive lower end (list 0 separately: "
            f"{key}=0,... is a categorical value, not a log-scale one)",
        )
    if "int" in sweep.tags or _int_key(key):
        lo, hi = math.ceil(low), math.floor(high)
        if lo > hi:
            raise ConfigError(key, text, "an interval containing an integer (the key is an integer)")
        return Dimension(key, "int", low=lo, high=hi, log=log)
    return Dimension(key, "float", low=float(low), high=float(high), log=log)


def parse_space(args: list[str], group_options: Callable[[str], list[str]] | None = None) -> SearchSpace:
    """Split `key=value` command-line overrides into fixed overrides and swept dimensions.

    `group_options(group)` lists a config group's options, for `glob(...)` sweeps.
    """
    parser = OverridesParser.create()
    space = SearchSpace()
    seen: set[str] = set()
    for arg in args:
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            first = str(err).strip().splitlines()[0]
            hint = "quote values with special characters, key='...'"
            raise ConfigError(
                arg.split("=", 1)[0], arg, f"an override in Hydra syntax ({first}; {hint})"
            ) from None
        key = override.get_key_element()
        bare = override.key_or_group
        if bare == "out_dir":
            raise ConfigError(
                "out_dir",
                override.get_value_string(),
                f"not set in a sweep: each trial runs in "
                f"<sweep dir>/trials/<number> (set the sweep dir with {SWEEP_DIR_KEY}=...)",
            )
        if bare == SEARCHPATH_KEY:  # the user's own config groups: every trial composes with them
            space.fixed.append(arg.strip())
            continue
        if bare.startswith("hydra.") or bare == "hydra":
            if bare != SWEEP_DIR_KEY:
                space.ignored.append(arg)
            elif override.is_sweep_override():
                raise ConfigError(bare, override.get_value_string(), "one directory, not a sweep")
            else:
                space.sweep_dir = str(override.value())
            continue
        if not override.is_sweep_override():
            space.fixed.append(arg.strip())
            continue
        if bare in seen:
            raise ConfigError(bare, override.get_value_string(), "swept once per command (it is given twice)")
        seen.add(bare)
        if bare == "sweep" or bare.startswith("sweep."):
            raise ConfigError(bare, override.get_value_string(), "one value: sweep settings are not swept")
        value = override.value()
        if isinstance(value, ChoiceSweep):
            space.dims.append(_choice_dim(key, value.list))
        elif isinstance(value, RangeSweep):
            space.dims.append(_range_dim(key, value))
        elif isinstance(value, IntervalSweep):
            space.dims.append(_interval_dim(key, value))
        elif isinstance(value, Glob):
            options = group_options(bare) if group_options is not None else []
            matched = value.filter(options)
            if not matched:
                raise ConfigError(
                    bare,
                    override.get_value_string(),
                    f"a glob matching options of the group ({', '.join(options) or 'none found'})",
                )
            space.dims.append(_choice_dim(key, matched))
        else:  # pragma: no cover - Hydra has no other sweep types
            raise ConfigError(bare, override.get_value_string(), "a list, choice(), range() or interval()")
    # Canonical order, so `lr=... l1_lambda=...` is the same sweep (and study) as `l1_lambda=... lr=...`.
    space.dims.sort(key=lambda d: d.name)
    return space
