"""`python -m sae_sweep -m key=a,b ...`: plan the sweep, create (or resume) its study, start the workers,
print the table at the end.

The same command is also how a sweep resumes (after Ctrl-C, a kill, a crash or a power cut) and how a
second machine joins it: the study name is derived from the command, the study keeps the queue, and
trials whose worker died are re-enqueued to continue from their checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage
from optuna.study import StudyDirection

from sae_sweep.compose import Composer
from sae_sweep.errors import ConfigError, SaeSweepError
from sae_sweep.rundir import shown_path
from sae_sweep.sweep import saved, trialdirs
from sae_sweep.sweep.plan import SweepPlan, check_sweep_dir, difference, make_plan, make_sampler
from sae_sweep.sweep.queue import (
    IDENTITY_ATTR,
    READY_ATTR,
    REASON_ATTR,
    enqueue_missing,
    pending,
    recover,
    retry_failed,
)
from sae_sweep.sweep.roster import live_workers
from sae_sweep.sweep.summary import counts, format_table, sweep_frame, write_csv
from sae_sweep.sweep.worker import Worker, WorkerSpec, quiet_optuna, say, spec_json

MULTIRUN_FLAGS = ("-m", "--multirun")
CHILD_STOP_TIMEOUT_S = 300  # a worker told to stop finishes its step and writes its checkpoint first


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def prepare_study(plan: SweepPlan, composer: Composer | None = None) -> tuple[optuna.Study, BaseStorage]:
    """Create the study (once, before any worker starts) or load it and check it is this sweep's; fill the
    queue with what is missing, re-enqueue trials whose worker died and trials that failed, and (a study
    created over existing trial directories) reuse the runs found there."""
    raw = plan.store.open()
    sampler = make_sampler(plan)
    identity = _normalised(plan.identity())
    created = False
    with plan.store.fill_lock():  # commands started at once: one creates and fills, the others then see it
        trialdirs.check_owner(plan, raw, identity)
        try:
            study = optuna.create_study(
                storage=raw,
                study_name=plan.study_name,
                sampler=sampler,
                directions=[StudyDirection(2 if o.direction == "maximize" else 1) for o in plan.objectives],
            )
            study.set_user_attr(IDENTITY_ATTR, identity)
            created = True
        except DuplicatedStudyError:
            study = optuna.load_study(study_name=plan.study_name, storage=raw, sampler=sampler)
            stored = study.user_attrs.get(IDENTITY_ATTR)
            if stored is None:
                study.set_user_attr(IDENTITY_ATTR, identity)
            elif stored != identity:
                raise ConfigError(
                    "sweep.study_name",
                    plan.study_name,
                    f"a new name: study '{plan.study_name}' in {plan.store.url} was created by a different "
                    f"sweep ({difference(stored, identity)}); pass another sweep.study_name or delete it",
                ) from None
        grid = plan.space.grid() if plan.sampler == "grid" else None
        added = enqueue_missing(study, grid, plan.n_trials or 0)
        study.set_user_attr(READY_ATTR, True)
        reused = aside = 0
        if created and composer is not None:
            reused, aside = trialdirs.adopt_runs(plan, composer, study)
        trialdirs.write_marker(plan)
        recovered = recover(study, plan.store, raw)
        retried = retry_failed(study)
    if added:
        say("", f"queued {added} trials")
    if reused or aside:
        say(
            "",
            f"new study over existing trial directories: {reused} runs reused"
            + (
                f", {aside} that are no trial of this sweep moved to {plan.sweep_dir / trialdirs.SET_ASIDE}"
                if aside
                else ""
            ),
        )
    for number in recovered:
        say("", f"trial {number}: its worker stopped; re-enqueued to resume from its checkpoint")
    for t in retried:
        why = t.user_attrs.get(REASON_ATTR, "no reason recorded")
        say("", f"trial {t.number} failed before ({why}); retried in case its cause is gone")
    return study, raw


def _run_local_workers(plan: SweepPlan, composer: Composer, study: optuna.Study, raw: BaseStorage) -> int:
    """Run `sweep.workers` workers on this machine; returns the exit status (130 when interrupted)."""
    n = int(plan.settings.workers)
    if n == 1:
        try:
            Worker(plan, composer, study, raw).loop()
        except KeyboardInterrupt:
            return 130
        return 0
    cwd = os.getcwd()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sae_sweep.sweep.worker",
                spec_json(WorkerSpec(plan.overrides, cwd, i, n, die_with_parent=True)),
            ]
        )
        for i in range(n)
    ]

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:
        for proc in procs:  # Ctrl-C reaches them too; SIGTERM covers a driver stopped by kill
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=CHILD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [p.returncode for p in procs if p.returncode not in (0, None)]
    return 1 if failed else 0


def _launch_jobs(plan: SweepPlan, study: optuna.Study) -> tuple[int, bool]:
    """SLURM: report the sweep's jobs (live ones, failed ones with their error), submit jobs only for
    waiting work no live worker will take, and wait for them if asked; (exit status, whether done here)."""
    from sae_sweep.sweep.slurm import job_states, record_jobs, submit_workers

    s = plan.settings
    live, failed = job_states(study, plan.store.grace_s)
    for job_id, error in failed:
        say("", f"worker job {job_id} failed: {error}")
    takeable, running = pending(study, plan.n_trials)
    others = len(live_workers(study, plan.store.grace_s))  # workers of any kind: jobs, copies, machines
    busy = max(others, len(live))
    n = max(0, min(int(s.workers), takeable) - busy)
    if live:
        say(
            "",
            f"{len(live)} worker jobs live ({', '.join(live)}): {takeable} trials waiting, {running} running",
        )
    jobs = submit_workers(plan, n) if n else []
    if jobs:
        folder = Path(s.slurm.log_dir or plan.sweep_dir / "slurm").absolute()
        record_jobs(study, jobs, folder, s.slurm.cluster)
        say(
            "",
            f"submitted {len(jobs)} worker jobs: {', '.join(str(j.job_id) for j in jobs)} (logs in {folder})",
        )
    elif takeable:
        say("", f"no job submitted: the {busy} live workers take the {takeable} waiting trials")
    status = 1 if failed else 0
    if not s.slurm.wait:
        if jobs or live:
            say("", "the same command shows progress and the table, and joins the sweep if it is not done")
        return status, not (jobs or live)
    for job in jobs:
        try:
            job.result()
        except Exception as err:  # a job that died: named, and the command fails; its trial is retried
            say("", f"worker job {job.job_id} failed: {str(err).strip().splitlines()[-1]}")
            status = 1
    job_states(study, plan.store.grace_s)  # record the verdicts, so a re-run does not report them again
    return status, True


def _launch(plan: SweepPlan, composer: Composer, study: optuna.Study, raw: BaseStorage) -> tuple[int, bool]:
    """Start the workers; returns (exit status, whether the sweep ran to its end here)."""
    if plan.settings.launcher == "slurm":
        return _launch_jobs(plan, study)
    return _run_local_workers(plan, composer, study, raw), True


def full_report(plan: SweepPlan) -> Path | None:
    """The report package's tables and plots (report/index.html, trials.csv, ...), when it is installed;
    None if it is not or it fails, and then summary.write_csv's trials.csv is the report."""
    try:
        from sae_sweep.report import write_report
    except ImportError:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            features = bool(plan.settings.report_features)
            return Path(
                write_report(
                    plan.sweep_dir,
                    study_name=plan.study_name,
                    progress=False,
                    storage=plan.store.url,
                    features=features,
                )
            )
    except Exception as err:  # the table and trials.csv must not depend on the plots
        say("", f"the full report failed ({type(err).__name__}: {err}); writing report/trials.csv only")
        return None


def _read_only(plan: SweepPlan) -> bool:
    return plan.sweep_dir.is_dir() and not os.access(plan.sweep_dir, os.W_OK | os.X_OK)


def _show_read_only(plan: SweepPlan) -> int:
    """A sweep directory this user cannot write: show a finished sweep's table, refuse to run one."""
    if plan.store.kind == "sqlite":
        from sae_sweep.report.study import open_storage

        raw = open_storage(plan.store.url)  # read-only: no journal or lock file to create
    else:
        raw = plan.store.open()
    try:
        study = optuna.load_study(study_name=plan.study_name, storage=raw)
    except KeyError:
        raise ConfigError(
            "hydra.sweep.dir", str(plan.sweep_dir), "a directory this user can write in: it is read-only"
        ) from None
    takeable, running = pending(study, plan.n_trials)
    if takeable or running:
        raise ConfigError(
            "hydra.sweep.dir",
            str(plan.sweep_dir),
            f"a directory this user can write in: it is read-only and its sweep has {takeable + running} "
            "trials left to run",
        )
    _print_summary(
        plan,
        sweep_frame(plan.sweep_dir, plan.study_name, plan.store.url),
        f"not written ({shown_path(plan.sweep_dir)} is read-only)",
    )
    return 0


def _print_summary(plan: SweepPlan, frame: Any, report: Path | str) -> None:
    """The table, the counts, the sweep directory and the report (a path, or why there is none)."""
    print(format_table(frame, [o.metric for o in plan.objectives]))
    print(f"{counts(frame)}; * = Pareto front of {', '.join(str(o) for o in plan.objectives)}")
    print(f"sweep directory: {shown_path(plan.sweep_dir)}")
    print(f"report: {shown_path(report) if isinstance(report, Path) else report}")


def _error_line(err: BaseException, plan: SweepPlan | None) -> str:
    """One line for a filesystem or storage error that stopped the command."""
    if isinstance(err, OSError):
        where = f"'{err.filename}'" if err.filename else "a file"
        return f"{where}: {err.strerror or err}"
    where = plan.store.url if plan is not None else "the study storage"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"study storage '{where}': {first}"


def run(overrides: list[str]) -> int:
    quiet_optuna()
    plan: SweepPlan | None = None
    try:
        overrides = saved.expand(overrides)  # sweeps/NAME.yaml definitions -> their overrides
        with Composer() as composer:
            plan = make_plan(overrides, composer)
            for ignored in plan.space.ignored:
                say("", f"ignoring {ignored}: a sweep reads hydra.sweep.dir only")
            say("", f"study {plan.study_name}: {plan.describe()}")
            say("", f"sweep directory {plan.sweep_dir} (storage {plan.store.url})")
            if _read_only(plan):
                return _show_read_only(plan)
            check_sweep_dir(plan.sweep_dir)
            study, raw = prepare_study(plan, composer)
            takeable, running = pending(study, plan.n_trials)
            status, finished = 0, True
            if takeable == 0 and running == 0 and plan.settings.launcher != "slurm":
                say("", "nothing left to run")
            else:  # SLURM: also when nothing is left, to report jobs that failed since the last look
                status, finished = _launch(plan, composer, study, raw)
    except SaeSweepError as err:
        print(f"sae_sweep: error: {err}", file=sys.stderr)
        return 2
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as err:
        print(f"sae_sweep: error: {_error_line(err, plan)}", file=sys.stderr)
        return 2
    frame = sweep_frame(plan.sweep_dir, plan.study_name, plan.store.url)
    report = (plan.settings.report and full_report(plan)) or write_csv(frame, plan.sweep_dir / "report")
    _print_summary(plan, frame, report)
    if status == 130:
        print("sweep interrupted: run the same command again to resume it", file=sys.stderr)
    elif not finished:
        print("sweep still running in its jobs", file=sys.stderr)
    return status


def main(argv: list[str]) -> int:
    """argv: the command line after `python -m sae_sweep`, containing -m/--multirun."""
    args = [a for a in argv if a not in MULTIRUN_FLAGS]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        print(
            f"sae_sweep: error: {flags[0]} is not supported with -m (a sweep takes key=value overrides; "
            "run without -m to use Hydra's flags on a single run)",
            file=sys.stderr,
        )
        return 2
    return run(args)
