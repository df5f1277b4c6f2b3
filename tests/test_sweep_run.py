"""Sweeps in one process: grid completeness, the TPE budget across restarts, failures, pruning, resume."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import SMALL_DATA
from optuna.trial import TrialState

from sae_sweep.errors import PackInterrupted
from sae_sweep.sweep import driver, worker
from sae_sweep.sweep import optuna_adapter as oa
from sae_sweep.sweep.queue import GRID_ATTR
from sae_sweep.train import train as real_train

optuna.logging.set_verbosity(optuna.logging.WARNING)


def small_args(data_root: Path, sweep_dir: Path, **overrides) -> list[str]:
    """Overrides for tiny trials (about a second each) on the tests' small ground-truth data."""
    args: dict[str, Any] = {f"data.{k}": v for k, v in SMALL_DATA.items()}
    args.update(
        {
            "data.path": data_root,
            "batch_size": 512,
            "hidden_dim": 64,
            "tokens": 30_000,
            "device": "cpu",
            "train.progress": "false",
            "train.log_every_tokens": 4096,
            "train.dead_window": 100_000,
            "hydra.sweep.dir": sweep_dir,
            "sweep.report": "false",  # the report package's plots have tests of their own
        }
    )
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def patch_train(monkeypatch, fn) -> None:
    """Every trial the worker trains (packed or not) goes through fn(cfg, on_log), one after another
    (nothing to release: these run one worker)."""

    def fake_pack(cfgs, on_logs, release=None):
        done = {}
        for i, (cfg, on_log) in enumerate(zip(cfgs, on_logs, strict=True)):
            try:
                done[i] = fn(cfg, on_log)
            except KeyboardInterrupt:
                raise PackInterrupted(done) from None
            except Exception as err:
                done[i] = err
        return [done[i] for i in range(len(cfgs))]

    monkeypatch.setattr(worker, "train_pack", fake_pack)


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=None, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path / "sweep"


def test_grid_runs_every_point_exactly_once_and_records_it(data_root, sweep_dir, capsys):
    args = small_args(data_root, sweep_dir)
    assert driver.run(["l1_lambda=0,1e-9,5", "lr=1e-3,1e-4", *args, "sweep.n_trials=2"]) == 0
    study = load(sweep_dir)
    trials = study.get_trials()
    assert states(study) == ["COMPLETE"] * 6  # n_trials does not truncate a grid
    points = sorted((t.params["l1_lambda"], t.params["lr"]) for t in trials)
    assert points == sorted(itertools.product((0, 1e-9, 5), (1e-3, 1e-4)))
    assert sorted(t.user_attrs[GRID_ATTR] for t in trials) == list(range(6))
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert run == sweep_dir / "trials" / str(t.number)
        metrics = json.loads((run / "metrics.json").read_text())
        assert t.values == [metrics["fvu"], metrics["l0"]]
        assert {k: t.user_attrs[k] for k in ("fvu", "l0", "mcc", "dead_frac")} == {
            k: metrics[k] for k in ("fvu", "l0", "mcc", "dead_frac")
        }
    with open(sweep_dir / "report" / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {"l1_lambda", "lr", "state", "status", "pareto", "fvu", "l0", "run_dir"} <= set(
        rows[0]
    )
    assert (sweep_dir / "report" / "table.md").is_file()  # written with sweep.report=false too
    out = capsys.readouterr().out
    # the summary names the sweep directory and the report relative to the working directory
    assert (
        "explained_variance" in out and "sweep directory: sweep\n" in out and "report: sweep/report/" in out
    )
    assert "6 completed" in out

    # the same command again: nothing is repeated; with the full report (plots, when the report package
    # is installed) its trials.csv still has one row per trial
    assert driver.run(["lr=1e-3,1e-4", "l1_lambda=0,1e-9,5", *args, "sweep.report=true"]) == 0
    assert len(load(sweep_dir).get_trials()) == 6
    out = capsys.readouterr().out
    assert "nothing left to run" in out
    report = Path(out.split("report: ")[-1].strip()).absolute()
    assert report.is_file() and report.parent == sweep_dir / "report"
    with open(sweep_dir / "report" / "trials.csv") as fh:
        full = list(csv.DictReader(fh))
    assert len(full) == 6
    assert list(full[0]) == list(rows[0])  # one trials table: the same columns whatever sweep.report says


def test_tpe_budget_is_a_total_across_restarts(data_root, sweep_dir):
    space = ["lr=tag(log,interval(1e-4,1e-2))", "l1_lambda=0,1"]  # 0 stays legal beside a log range
    args = small_args(data_root, sweep_dir, **{"sweep.seed": 0, "sweep.pruner": "none"})
    assert driver.run([*space, *args, "sweep.n_trials=3"]) == 0
    assert states(load(sweep_dir)) == ["COMPLETE"] * 3
    assert driver.run([*space, *args, "sweep.n_trials=3"]) == 0
    assert len(load(sweep_dir).get_trials()) == 3
    assert driver.run([*space, *args, "sweep.n_trials=5"]) == 0
    trials = load(sweep_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    assert all(1e-4 <= t.params["lr"] <= 1e-2 and t.params["l1_lambda"] in (0, 1) for t in trials)


def test_nsga2_runs_its_budget(data_root, sweep_dir):
    args = small_args(data_root, sweep_dir)
    assert driver.run(["lr=tag(log,interval(1e-4,1e-2))", "sweep=nsga2", "sweep.n_trials=3", *args]) == 0
    assert states(load(sweep_dir)) == ["COMPLETE"] * 3


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(data_root, sweep_dir, monkeypatch):
    def flaky_train(cfg, on_log=None):
        if cfg.seed == 1:
            raise RuntimeError("a worker bug")
        if cfg.seed == 2:
            return {**real_train(cfg, on_log), "fvu": float("nan")}
        return real_train(cfg, on_log)

    patch_train(monkeypatch, flaky_train)
    args = small_args(data_root, sweep_dir)
    assert driver.run(["seed=0,1,2,3", "lr=1e-3,1e30", *args]) == 0
    by_point = {(t.params["seed"], t.params["lr"]): t for t in load(sweep_dir).get_trials()}
    assert len(by_point) == 8
    assert (
        by_point[(0, 1e-3)].state == TrialState.COMPLETE and by_point[(3, 1e-3)].state == TrialState.COMPLETE
    )
    assert by_point[(1, 1e-3)].state == TrialState.FAIL
    assert by_point[(1, 1e-3)].user_attrs["reason"] == "RuntimeError: a worker bug"
    nan = by_point[(2, 1e-3)]
    assert nan.state == TrialState.FAIL and "not a finite number" in nan.user_attrs["reason"]
    diverged = by_point[(0, 1e30)]
    assert diverged.state == TrialState.FAIL and diverged.user_attrs["status"] == "diverged"
    assert "lower lr" in diverged.user_attrs["reason"]


def test_a_collapsed_trial_is_pruned(data_root, sweep_dir):
    args = small_args(data_root, sweep_dir, hidden_dim=128, tokens=400_000)
    assert driver.run(["l1_lambda=1000,2000", *args]) == 0
    for t in load(sweep_dir).get_trials():
        assert t.state == TrialState.PRUNED and t.user_attrs["status"] == "collapsed"
        assert "silent" in t.user_attrs["reason"] and t.user_attrs["tokens"] < 400_000


def test_median_pruner_stops_a_trial_worse_than_the_completed_ones(data_root, sweep_dir):
    args = small_args(
        data_root,
        sweep_dir,
        tokens=60_000,
        **{
            "sweep.pruner": "median",
            "sweep.pruner_startup_trials": 2,
            "sweep.pruner_warmup_rows": 3,
            "sweep.objectives": "[explained_variance]",
        },
    )
    assert driver.run(["lr=1e-2,3e-3,1e-6", *args]) == 0  # grid points run in the order typed
    trials = {t.params["lr"]: t for t in load(sweep_dir).get_trials()}
    assert trials[1e-2].state == trials[3e-3].state == TrialState.COMPLETE
    slow = trials[1e-6]
    assert slow.state == TrialState.PRUNED and "median of 2 completed trials" in slow.user_attrs["reason"]
    assert slow.intermediate_values and max(slow.intermediate_values) < 60_000  # reported, single objective


def test_ctrl_c_interrupts_and_the_same_command_resumes(data_root, sweep_dir, monkeypatch):
    calls = []

    def interrupted_once(cfg, on_log=None):
        calls.append(cfg.out_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(cfg, on_log)

    patch_train(monkeypatch, interrupted_once)
    command = ["lr=1e-3,1e-4,3e-4", *small_args(data_root, sweep_dir, **{"sweep.pack": 1})]
    assert driver.run(command) == 130
    assert states(load(sweep_dir)) == ["COMPLETE", "FAIL", "WAITING", "WAITING"]  # the retry is queued
    assert driver.run(command) == 0
    trials = load(sweep_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["status"] == "interrupted"
    assert trials[3].system_attrs["failed_trial"] == 1 and trials[3].params == trials[1].params
    assert sorted(t.params["lr"] for t in trials if t.state == TrialState.COMPLETE) == [1e-4, 3e-4, 1e-3]


def test_a_changed_search_space_under_the_same_name_is_an_error(data_root, sweep_dir, capsys):
    args = small_args(data_root, sweep_dir, **{"sweep.study_name": "mine"})
    assert driver.run(["lr=1e-3,1e-4", *args]) == 0
    assert driver.run(["lr=1e-3,3e-4", *args]) == 2
    err = capsys.readouterr().err
    assert "'sweep.study_name' = 'mine'" in err and "different sweep" in err and "0.0003" in err
    assert len(load(sweep_dir).get_trials()) == 2


def test_a_bad_grid_point_stops_before_any_work(data_root, sweep_dir, capsys):
    assert driver.run(["l1_lambda=0,1", "model=relu,topk", *small_args(data_root, sweep_dir)]) == 2
    assert "l1_lambda" in capsys.readouterr().err
    assert not sweep_dir.exists()


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
@pytest.mark.parametrize("death", ["heartbeat stopped", "died while claiming"])
def test_a_trial_whose_worker_vanished_elsewhere_is_retried(data_root, sweep_dir, storage, death):
    from optuna.trial import TrialState

    from sae_sweep.compose import Composer
    from sae_sweep.sweep.plan import make_plan
    from sae_sweep.sweep.queue import claim
    from sae_sweep.sweep.store import OWNER_ATTR

    extra = {"sweep.heartbeat_s": 1, "sweep.grace_s": 2}
    if storage == "journal":
        extra["sweep.storage"] = sweep_dir / "study.journal"
    command = ["lr=1e-3,1e-4", *small_args(data_root, sweep_dir, **extra)]
    with Composer() as composer:
        plan = make_plan(command, composer)
        study, raw = driver.prepare_study(plan)
        if death == "heartbeat stopped":  # a worker on another machine took a trial, beat once, vanished
            with plan.store.lock():
                trial_id = claim(study, plan.store, raw, None)
            assert trial_id is not None
            oa.set_trial_system_attr(study, trial_id, OWNER_ATTR, {"machine": "elsewhere", "pid": 1})
        else:  # killed between taking the trial and recording anything about itself
            trial_id = oa.trial_id(study.get_trials()[0])
            oa.set_state(study, trial_id, TrialState.RUNNING)
    assert driver.run(command) == 0  # waits out the grace period, then retries the silent trial
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].user_attrs["status"] == "interrupted" and trials[2].system_attrs["failed_trial"] == 0
