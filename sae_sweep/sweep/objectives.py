"""What a sweep optimises: metric names of metrics.json with directions, and their running proxies.

The default, `fvu` and `l0` both minimised, makes a multi-objective study whose Pareto front is the
sparsity / reconstruction trade-off. While a trial trains, each objective is tracked through a column of
curves.csv (fvu and explained_variance through the running mse, which is proportional to fvu on the same
data) so a pruner can compare trials mid-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sae_sweep.errors import ConfigError
from sae_sweep.metrics import GROUND_TRUTH, MAXIMIZE, METRICS, MINIMIZE

_ALIASES = {"min": MINIMIZE, "minimize": MINIMIZE, "max": MAXIMIZE, "maximize": MAXIMIZE}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"

    def badness(self, row: dict[str, Any]) -> float | None:
        """This objective's running value from a curves.csv row, oriented so that lower is better."""
        m = METRICS[self.metric]
        if m.running is None:
            return None
        value = float(row[m.running])
        return value if m.running_rises == (self.direction == MINIMIZE) else -value

    def reported(self, row: dict[str, Any]) -> float | None:
        """The running value in the metric's own orientation (what Optuna's intermediate values hold)."""
        m = METRICS[self.metric]
        if m.running is None:
            return None
        return float(row[m.running]) if m.running_rises else -float(row[m.running])


def parse_objectives(specs: list[str], data_kind: str) -> list[Objective]:
    objectives = []
    for spec in specs:
        metric, _, direction = str(spec).partition(":")
        metric = metric.strip()
        known = sorted(METRICS)
        if metric not in known:
            raise ConfigError("sweep.objectives", spec, "metric names of metrics.json: " + ", ".join(known))
        if direction:
            if direction.strip().lower() not in _ALIASES:
                raise ConfigError("sweep.objectives", spec, f"{metric}:minimize or {metric}:maximize")
            direction = _ALIASES[direction.strip().lower()]
        elif (natural := METRICS[metric].direction) is not None:
            direction = natural
        else:
            raise ConfigError(
                "sweep.objectives", spec, f"a direction: {metric}:minimize or {metric}:maximize"
            )
        if METRICS[metric].needs == GROUND_TRUTH and data_kind != "synthetic":
            raise ConfigError(
                "sweep.objectives",
                spec,
                f"metrics that data={data_kind} has: {metric} needs the ground truth of data=synthetic",
            )
        if any(o.metric == metric for o in objectives):
            raise ConfigError("sweep.objectives", spec, "each metric once")
        objectives.append(Objective(metric, direction))
    return objectives


def objective_values(objectives: list[Objective], metrics: dict[str, Any]) -> tuple[list[float] | None, str]:
    """The trial's values, or None and the reason they cannot be recorded (missing or not finite)."""
    values = []
    for o in objectives:
        value = metrics.get(o.metric)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, f"objective {o.metric} is {value!r}, not a finite number"
        values.append(float(value))
    return values, ""
