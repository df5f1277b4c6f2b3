"""A claimed trial on its way through a worker (`Member`), and how its outcome is written into the study:
state (completed, pruned/collapsed, failed), objective values, metrics and status as user attributes."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import Trial, TrialState

from sae_sweep import rundir
from sae_sweep.errors import RunStopped, SaeSweepError
from sae_sweep.sweep.objectives import Objective, objective_values
from sae_sweep.sweep.queue import REASON_ATTR, STATUS_ATTR
from sae_sweep.train.loop import Outcome

# How a stopped run is recorded: pruned and collapsed runs stopped early on purpose, diverged ones failed.
STOPPED_STATES = {"pruned": TrialState.PRUNED, "collapsed": TrialState.PRUNED, "diverged": TrialState.FAIL}


@dataclass
class Member:
    """A claimed trial on its way through a pack."""

    trial: Trial
    params: dict[str, Any]
    run_dir: Path
    curve: list[list[float]]
    cfg: DictConfig | None = None
    error: SaeSweepError | None = None  # its config could not be composed
    outcome: Outcome | None = None
    pack_why: str = ""
    taken_over: bool = False
    released: bool = False  # let go to a worker that joined; its trial is WAITING again


def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def judge(
    m: Member, objectives: list[Objective]
) -> tuple[TrialState, list[float] | None, str, str, dict[str, Any]]:
    """(state, values, status, reason, metrics) of a member's outcome."""
    outcome = m.outcome
    if isinstance(outcome, RunStopped):
        state = STOPPED_STATES.get(outcome.status, TrialState.FAIL)
        return state, None, outcome.status, outcome.reason, _read_metrics(m.run_dir)
    if isinstance(outcome, SaeSweepError):
        return TrialState.FAIL, None, "failed", str(outcome), _read_metrics(m.run_dir)
    if isinstance(outcome, BaseException):  # a bug or a broken environment in one trial: not the sweep's end
        why = f"{type(outcome).__name__}: {outcome}"
        return TrialState.FAIL, None, "failed", why, _read_metrics(m.run_dir)
    assert outcome is not None
    metrics: dict[str, Any] = dict(outcome)
    if metrics.get("status") in STOPPED_STATES:  # evaluated, but not a result (e.g. FVU >= 1: collapsed)
        status = str(metrics["status"])
        return STOPPED_STATES[status], None, status, str(metrics.get("reason", "")), metrics
    values, why = objective_values(objectives, metrics)
    if values is None:
        return TrialState.FAIL, None, "failed", why, metrics
    return TrialState.COMPLETE, values, "completed", "", metrics


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    metrics = rundir.read_metrics(run_dir) or {}
    return {k: v for k, v in metrics.items() if k not in (STATUS_ATTR, REASON_ATTR)}


def record(study: optuna.Study, m: Member, objectives: list[Objective], started: float) -> str:
    """Write a member's outcome into the study; returns the line saying what happened to it."""
    state, values, status, reason, metrics = judge(m, objectives)
    trial = m.trial
    if status == "failed" and isinstance(m.outcome, BaseException):
        if not isinstance(m.outcome, (SaeSweepError, RunStopped)):  # a bug: its traceback helps
            err = m.outcome
            traceback.print_exception(type(err), err, err.__traceback__)
    attrs = {**{k: _json_safe(v) for k, v in metrics.items()}, "run_dir": str(m.run_dir), STATUS_ATTR: status}
    if reason:
        attrs[REASON_ATTR] = reason
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, values, state=state)
    except (UpdateFinishedTrialError, ValueError) as err:
        return (
            f"trial {trial.number}: could not be recorded ({err}); another worker took it over after its "
            "heartbeat stopped, and its retry will reuse this run"
        )
    summary = " ".join(
        f"{o.metric}={metrics[o.metric]:.4g}"
        for o in objectives
        if isinstance(metrics.get(o.metric), (int, float))
    )
    why = f" ({reason})" if reason else ""
    return f"trial {trial.number}: {status}{why} {summary} [{time.monotonic() - started:.0f} s]"
