"""One sweep worker: take the next trial of the shared study, train it with the same `train(cfg)` a single
run uses, record the outcome; repeat until the study has nothing left to run.

    python -m sae_sweep.sweep.worker '<WorkerSpec as JSON>'     (started by the driver, or a SLURM job)
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import Trial, TrialState

from sae_sweep.errors import SaeSweepError
from sae_sweep.sweep.compose import Composer, trial_config
from sae_sweep.sweep.objectives import objective_values
from sae_sweep.sweep.plan import SweepPlan, make_plan, make_sampler
from sae_sweep.sweep.pruning import CURVE_ATTR, MedianPruner
from sae_sweep.sweep.queue import REASON_ATTR, STATUS_ATTR, claim, fail_and_retry, pending, recover
from sae_sweep.sweep.space import Dimension, format_value
from sae_sweep.sweep.store import Heartbeat
from sae_sweep.train import train
from sae_sweep.train.trainer import RunStopped

# How a stopped run is recorded: pruned and collapsed runs stopped early on purpose, diverged ones failed.
STOPPED_STATES = {"pruned": TrialState.PRUNED, "collapsed": TrialState.PRUNED, "diverged": TrialState.FAIL}


@dataclass
class WorkerSpec:
    overrides: list[str]  # the sweep command's overrides; the worker rebuilds the plan from them
    cwd: str  # the command's working directory (relative paths in the overrides are relative to it)
    worker_index: int = 0
    n_workers: int = 1  # workers sharing this machine's cores
    die_with_parent: bool = False  # a local worker stops (checkpointing) when its driver dies


def say(label: str, message: str) -> None:
    print(f"[sweep{label}] {message}", flush=True)


def suggest(trial: Trial, dim: Dimension) -> Any:
    if dim.kind == "categorical":
        return trial.suggest_categorical(dim.name, list(dim.choices))
    if dim.kind == "int":
        return trial.suggest_int(dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)


def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class Worker:
    def __init__(
        self,
        plan: SweepPlan,
        composer: Composer,
        study: optuna.Study,
        raw: BaseStorage,
        label: str = "",
        progress: bool | None = None,
    ) -> None:
        self.plan, self.composer, self.study, self.raw = plan, composer, study, raw
        self.label, self.progress = label, progress
        s = plan.settings
        self.pruner = MedianPruner(s.pruner_startup_trials, s.pruner_warmup_rows) if plan.pruning else None
        self.poll_s = min(5.0, float(s.heartbeat_s))

    def loop(self) -> int:
        """Run trials until none is left to take and none is running elsewhere; returns how many ran here."""
        ran = 0
        while True:
            with self.plan.store.lock():
                recovered = recover(self.study, self.plan.store, self.raw)
                trial_id = claim(self.study, self.plan.store, self.raw, self.plan.n_trials)
            for number in recovered:
                say(
                    self.label,
                    f"trial {number}: its worker stopped; re-enqueued to resume from its checkpoint",
                )
            if trial_id is not None:
                self.run_trial(trial_id)
                ran += 1
                continue
            takeable, running = pending(self.study, self.plan.n_trials)
            if takeable == 0 and running == 0:
                return ran
            if takeable == 0:  # others are still running: wait, in case one of them dies
                time.sleep(self.poll_s)

    def _adopt_previous_attempt(self, trial: Trial, system_attrs: dict[str, Any], run_dir: Path) -> None:
        """A retried trial continues in its own directory, from the checkpoint of the attempt before."""
        history = system_attrs.get("retry_history", [])
        for number in reversed(history):
            old = self.plan.sweep_dir / "trials" / str(number)
            if old.is_dir() and not run_dir.exists():
                old.rename(run_dir)
                say(self.label, f"trial {trial.number}: continues trial {number}'s run (moved to {run_dir})")
                return

    def run_trial(self, trial_id: int) -> None:
        trial = Trial(self.study, trial_id)
        system_attrs = self.study._storage.get_trial(trial_id).system_attrs
        run_dir = self.plan.sweep_dir / "trials" / str(trial.number)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._adopt_previous_attempt(trial, system_attrs, run_dir)
        started = time.monotonic()
        with Heartbeat(self.plan.store, self.raw, trial_id):
            params = {d.name: suggest(trial, d) for d in self.plan.space.dims}
            shown = " ".join(f"{k}={format_value(v)}" for k, v in params.items()) or "(no swept keys)"
            say(self.label, f"trial {trial.number}: {shown} -> {run_dir}")
            state, values, status, reason, metrics = self._train(trial, params, run_dir, system_attrs)
            attrs = {
                **{k: _json_safe(v) for k, v in metrics.items()},
                "run_dir": str(run_dir),
                STATUS_ATTR: status,
            }
            if reason:
                attrs[REASON_ATTR] = reason
            try:
                for key, value in attrs.items():
                    trial.set_user_attr(key, value)
                self.study.tell(trial, values, state=state)
            except (UpdateFinishedTrialError, ValueError) as err:
                say(
                    self.label,
                    f"trial {trial.number}: could not be recorded ({err}); another worker took it "
                    "over after its heartbeat stopped, and its retry will reuse this run",
                )
                return
        summary = " ".join(
            f"{o.metric}={metrics[o.metric]:.4g}"
            for o in self.plan.objectives
            if isinstance(metrics.get(o.metric), (int, float))
        )
        why = f" ({reason})" if reason else ""
        say(self.label, f"trial {trial.number}: {status}{why} {summary} [{time.monotonic() - started:.0f} s]")

    def _train(
        self, trial: Trial, params: dict[str, Any], run_dir: Path, system_attrs: dict[str, Any]
    ) -> tuple[TrialState, list[float] | None, str, str, dict[str, Any]]:
        """Train the trial; returns (state, values, status, reason, metrics). Interrupts re-enqueue it."""
        curve: list[list[float]] = list(system_attrs.get(CURVE_ATTR, []))
        objectives = self.plan.objectives

        def on_log(row: dict[str, float]) -> None:
            badness = [o.badness(row) for o in objectives]
            if any(b is None for b in badness):
                return
            tokens = float(row["tokens"])
            curve[:] = [c for c in curve if c[0] < tokens]  # rows logged again after a resume replace the old
            curve.append([tokens, *badness])  # type: ignore[list-item]
            self.study._storage.set_trial_system_attr(trial._trial_id, CURVE_ATTR, curve)
            if len(objectives) == 1:
                trial.report(objectives[0].reported(row), step=int(tokens))  # type: ignore[arg-type]
            if self.pruner is not None:
                why = self.pruner.check(self.study, curve)
                if why:
                    raise RunStopped("pruned", why)

        try:
            cfg = trial_config(
                self.composer.compose(self.plan.space.overrides(params)), run_dir, self.progress
            )
            metrics = train(cfg, on_log=on_log)
        except RunStopped as err:
            state = STOPPED_STATES.get(err.status, TrialState.FAIL)
            return state, None, err.status, err.reason, _read_metrics(run_dir)
        except KeyboardInterrupt:
            with self.plan.store.lock():
                fail_and_retry(
                    self.study,
                    self.study._storage.get_trial(trial._trial_id),
                    "interrupted (Ctrl-C or SIGTERM); resumed by a retry",
                )
            say(
                self.label,
                f"trial {trial.number}: interrupted; the same command resumes it from its checkpoint",
            )
            raise
        except SaeSweepError as err:
            return TrialState.FAIL, None, "failed", str(err), _read_metrics(run_dir)
        except Exception as err:  # a bug or a broken environment in one trial must not end the sweep
            traceback.print_exc()
            return TrialState.FAIL, None, "failed", f"{type(err).__name__}: {err}", _read_metrics(run_dir)
        values, why = objective_values(objectives, metrics)
        if values is None:
            return TrialState.FAIL, None, "failed", why, metrics
        return TrialState.COMPLETE, values, "completed", "", metrics


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in metrics.items() if k not in (STATUS_ATTR, REASON_ATTR)}


def open_study(plan: SweepPlan, worker_index: int = 0) -> tuple[optuna.Study, BaseStorage]:
    raw = plan.store.open()
    study = optuna.load_study(
        study_name=plan.study_name, storage=raw, sampler=make_sampler(plan, worker_index)
    )
    return study, raw


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when its driver dies, so it checkpoints instead of running on unseen."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_worker(spec: WorkerSpec) -> int:
    """Run one worker to the end of the sweep; returns the number of trials it ran."""
    os.chdir(spec.cwd)
    if spec.die_with_parent:
        _die_with_parent()
    quiet_optuna()
    with Composer() as composer:
        plan = make_plan(spec.overrides, composer, check=False)
        threads = plan.settings.threads_per_worker
        if threads is None and spec.n_workers > 1:
            threads = max(1, (os.cpu_count() or 1) // spec.n_workers)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        study, raw = open_study(plan, spec.worker_index)
        label = f" w{spec.worker_index}" if spec.n_workers > 1 else ""
        progress = False if spec.n_workers > 1 else None  # interleaved progress bars are unreadable
        return Worker(plan, composer, study, raw, label, progress).loop()


def main(argv: list[str]) -> int:
    spec = WorkerSpec(**json.loads(argv[0]))
    try:
        run_worker(spec)
    except KeyboardInterrupt:
        return 130
    except SaeSweepError as err:
        print(f"sae_sweep: error: {err}", file=sys.stderr)
        return 2
    return 0


def spec_json(spec: WorkerSpec) -> str:
    return json.dumps(asdict(spec))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
