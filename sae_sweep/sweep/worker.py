"""One sweep worker: take the next trial of the shared study (with the trials it can share batches with,
within this worker's share), train them with the same `train_pack` a single run uses, record each outcome;
repeat until the study has nothing left to run. A worker joining late gets its share from the packs of
the others (sweep/rebalance.py); how outcomes are recorded is sweep/record.py.

    python -m sae_sweep.sweep.worker '<WorkerSpec as JSON>'     (started by the driver, or a SLURM job)
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from sae_sweep.compose import Composer, trial_config
from sae_sweep.errors import PackInterrupted, Released, RunStopped, SaeSweepError
from sae_sweep.sweep import optuna_adapter as oa
from sae_sweep.sweep.packing import Packer
from sae_sweep.sweep.plan import SweepPlan, make_plan, make_sampler
from sae_sweep.sweep.pruning import CURVE_ATTR, MedianPruner
from sae_sweep.sweep.queue import claim, claim_many, fail_and_retry, pending, recover
from sae_sweep.sweep.rebalance import Joining, Releaser
from sae_sweep.sweep.record import Member, record
from sae_sweep.sweep.roster import Registration, share
from sae_sweep.sweep.space import Dimension, format_value
from sae_sweep.sweep.store import OWNER_ATTR, Heartbeat, this_process
from sae_sweep.train.loop import stream_key
from sae_sweep.train.pack import train_pack


@dataclass
class WorkerSpec:
    overrides: list[str]  # the sweep command's overrides; the worker rebuilds the plan from them
    cwd: str  # the command's working directory (relative paths in the overrides are relative to it)
    worker_index: int = 0
    n_workers: int = 1  # workers this command started on this machine (they share its cores)
    die_with_parent: bool = False  # a local worker stops (checkpointing) when its driver dies


def say(label: str, message: str) -> None:
    print(f"[sweep{label}] {message}", flush=True)


def suggest(trial: Trial, dim: Dimension) -> Any:
    if dim.kind == "categorical":
        return trial.suggest_categorical(dim.name, list(dim.choices))
    if dim.kind == "int":
        return trial.suggest_int(dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)


class TrialTakenOver(BaseException):
    """Raised from a trial's log callback when the study no longer has it running for this worker: another
    worker took it over after this one was not heard from for the grace period (paused, cut off).
    A BaseException, so the trainer stops the pack without recording it as a failure of the run."""


class Worker:
    def __init__(
        self,
        plan: SweepPlan,
        composer: Composer,
        study: optuna.Study,
        raw: BaseStorage,
        label: str = "",
        progress: bool | None = None,
        wait_for: int = 1,
    ) -> None:
        self.plan, self.composer, self.study, self.raw = plan, composer, study, raw
        self.label, self.progress = label, progress
        # workers to wait for before the first claim: this command's own, or sweep.wait_for_workers
        self.wait_for = max(wait_for, int(getattr(plan.settings, "wait_for_workers", 1) or 1))
        self.roster: Registration | None = None
        self.joining: Joining | None = None  # until this worker's first pack is claimed
        s = plan.settings
        self.pruner = MedianPruner(s.pruner_startup_trials, s.pruner_warmup_rows) if plan.pruning else None
        self.poll_s = min(5.0, float(s.heartbeat_s))
        self.packer: Packer | None = None
        if s.pack != 1:
            self.packer = Packer(plan, study, lambda params: composer.compose(plan.space.overrides(params)))

    def loop(self) -> int:
        """Run trials until none is left to take and none is running elsewhere; returns how many ran here."""
        with Registration(self.study, self.plan.store) as roster:
            self.roster = roster
            if self.wait_for > 1:
                live = roster.wait_for(self.wait_for)
                if live < self.wait_for:
                    say(
                        self.label,
                        f"{live} of {self.wait_for} workers joined within sweep.grace_s="
                        f"{self.plan.store.grace_s} s; starting with {live}",
                    )
            self.joining = Joining(
                self.study, self.plan.store, self.plan.n_trials, roster, lambda line: say(self.label, line)
            )
            self.joining.wait()
            return self._loop()

    def _loop(self) -> int:
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
                ran += self.run_pack(trial_id)
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

    def _start(self, trial_id: int) -> Member:
        """Sample (or read) a claimed trial's parameters and compose its config."""
        trial = Trial(self.study, trial_id)
        system_attrs = oa.get_trial(self.study, trial_id).system_attrs
        run_dir = self.plan.sweep_dir / "trials" / str(trial.number)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._adopt_previous_attempt(trial, system_attrs, run_dir)
        params = {d.name: suggest(trial, d) for d in self.plan.space.dims}
        member = Member(trial, params, run_dir, list(system_attrs.get(CURVE_ATTR, [])))
        try:
            member.cfg = trial_config(
                self.composer.compose(self.plan.space.overrides(params)), run_dir, self.progress
            )
        except SaeSweepError as err:
            member.error = err
        return member

    def _claim_companions(self, first: Member) -> list[int]:
        """Claim the WAITING trials that can train on the same batches as `first`, as many as pay."""
        if self.packer is None or first.cfg is None:
            return []
        key = stream_key(first.cfg)
        limit, why = self.packer.limit(first.cfg)
        if limit <= 1:
            return []

        packer = self.packer

        def compatible(t: FrozenTrial) -> bool:
            return packer.key_of_waiting(t) == key

        first.pack_why = why
        taken: list[int] = []
        rounds = 0
        while True:
            live = self.roster.live() if self.roster is not None else 1
            with self.plan.store.lock():
                trials = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                budget_left, running = pending(self.study, self.plan.n_trials)
                takeable = min(sum(1 for t in trials if compatible(t)), budget_left)
                # this worker's share of the unfinished work, counting the trials it holds (running)
                mine = 1 + len(taken)
                size = min(limit, share(takeable + mine, running - mine, live))
                more = claim_many(
                    self.study, self.plan.store, self.raw, self.plan.n_trials, size - mine, compatible
                )
            if rounds and not more:  # what was released cannot join this pack (another stream)
                return taken
            taken, rounds = taken + more, rounds + 1
            # a worker that joined late: wait for the others to release what its first pack lacks
            if self.joining is None or not self.joining.wait(1 + len(taken), limit):
                return taken

    def run_pack(self, trial_id: int) -> int:
        """Run a claimed trial, with the compatible trials it can share batches with; returns how many ran."""
        started = time.monotonic()
        members = [self._start(trial_id)]
        with Heartbeat(self.plan.store, self.raw, trial_id):
            companions = self._claim_companions(members[0])
        self.joining = None
        with Heartbeat(self.plan.store, self.raw, [trial_id, *companions]) as heartbeat:
            members += [self._start(i) for i in companions]
            if len(members) > 1:
                numbers = ", ".join(str(m.trial.number) for m in members)
                say(
                    self.label,
                    f"trials {numbers}: packed, one pass over shared batches ({members[0].pack_why}; "
                    "sweep.pack=1 turns packing off)",
                )
            for m in members:
                shown = " ".join(f"{k}={format_value(v)}" for k, v in m.params.items()) or "(no swept keys)"
                say(self.label, f"trial {m.trial.number}: {shown} -> {m.run_dir}")
            try:
                self._train(members, heartbeat)
            except KeyboardInterrupt:
                self._end_unfinished(members, started, "interrupted (Ctrl-C or SIGTERM); resumed by a retry")
                for m in members:
                    if m.outcome is None:
                        say(
                            self.label,
                            f"trial {m.trial.number}: interrupted; the same command resumes it from its "
                            "checkpoint",
                        )
                raise
            except (TrialTakenOver, Exception) as err:
                taken = [m for m in members if m.outcome is None and self._taken_over(m)]
                for m in taken:
                    m.outcome = err if isinstance(err, Exception) else RuntimeError("taken over")
                    m.taken_over = True
                    say(
                        self.label,
                        f"trial {m.trial.number}: taken over by another worker while this one was not heard "
                        f"from for sweep.grace_s={self.plan.store.grace_s} s (paused or cut off); left to it",
                    )
                why = f"{type(err).__name__}: {err}" if isinstance(err, Exception) else "its pack was stopped"
                self._end_unfinished(members, started, f"interrupted ({why}); resumed by a retry")
                if not taken:  # not a take-over: the worker itself is broken (e.g. its storage): stop
                    raise
                return sum(1 for m in members if not m.released) - len(taken)
            for m in members:
                self._record(m, started)
        return sum(1 for m in members if not m.released)

    def _record(self, m: Member, started: float) -> None:
        if not m.released:
            say(self.label, record(self.study, m, self.plan.objectives, started))

    def _end_unfinished(self, members: list[Member], started: float, reason: str) -> None:
        """A pack that stopped early: record the members that had ended; re-enqueue the others, which
        resume from their checkpoints."""
        for m in members:
            if m.outcome is not None and not m.taken_over:
                self._record(m, started)  # a released member is not: its trial is another worker's
        with self.plan.store.lock():
            for m in members:
                if m.outcome is None:
                    fail_and_retry(self.study, oa.get_trial(self.study, oa.trial_id(m.trial)), reason)

    def _taken_over(self, m: Member) -> bool:
        """Whether the study no longer has this member running for this process."""
        t = oa.get_trial(self.study, oa.trial_id(m.trial))
        return t.state != TrialState.RUNNING or t.system_attrs.get(OWNER_ATTR) != this_process()

    def _on_log(self, m: Member) -> Callable[[dict[str, float]], None]:
        objectives = self.plan.objectives
        trial, curve = m.trial, m.curve

        def on_log(row: dict[str, float]) -> None:
            badness = [o.badness(row) for o in objectives]
            if any(b is None for b in badness):
                return
            tokens = float(row["tokens"])
            curve[:] = [c for c in curve if c[0] < tokens]  # rows logged again after a resume replace the old
            curve.append([tokens, *badness])  # type: ignore[list-item]
            try:
                oa.set_trial_system_attr(self.study, oa.trial_id(trial), CURVE_ATTR, curve)
            except UpdateFinishedTrialError:
                raise TrialTakenOver from None
            if len(objectives) == 1:
                trial.report(objectives[0].reported(row), step=int(tokens))  # type: ignore[arg-type]
            if self.pruner is not None:
                why = self.pruner.check(self.study, curve)
                if why:
                    raise RunStopped("pruned", why)

        return on_log

    def _train(self, members: list[Member], heartbeat: Heartbeat) -> None:
        """Train the members (those sharing a stream together) and set each one's outcome."""
        groups: dict[str, list[Member]] = {}
        for m in members:
            if m.error is not None or m.cfg is None:
                m.outcome = m.error
            else:
                groups.setdefault(stream_key(m.cfg), []).append(m)
        for group in groups.values():
            cfgs = [m.cfg for m in group if m.cfg is not None]
            try:
                on_logs = [self._on_log(m) for m in group]
                outcomes = train_pack(cfgs, on_logs, self._releaser(group, heartbeat))
            except PackInterrupted as stop:
                for j, outcome in stop.outcomes.items():
                    self._set_outcome(group[j], outcome)
                raise
            for m, outcome in zip(group, outcomes, strict=True):
                self._set_outcome(m, outcome)

    @staticmethod
    def _set_outcome(m: Member, outcome: Any) -> None:
        m.outcome = outcome
        m.released = isinstance(outcome, Released)

    def _releaser(self, group: list[Member], heartbeat: Heartbeat) -> Releaser | None:
        """The hook that shrinks this pack to the worker's share when another worker joins."""
        if len(group) < 2 or self.roster is None:
            return None

        def released(indices: list[int]) -> None:
            for i in indices:
                group[i].released = True
                say(
                    self.label,
                    f"trial {group[i].trial.number}: released to a worker that joined (this one now holds "
                    "its share); it resumes from its checkpoint there",
                )

        ids = [oa.trial_id(m.trial) for m in group]
        store, n = self.plan.store, self.plan.n_trials
        return Releaser(self.study, store, self.raw, n, self.roster, heartbeat, ids, released)


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
        return Worker(plan, composer, study, raw, label, progress, spec.n_workers).loop()


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
