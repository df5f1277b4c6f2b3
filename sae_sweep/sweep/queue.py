"""The study as a work queue: every trial a sweep will run exists up front as a WAITING trial.

A grid enqueues each point once; a Bayesian search enqueues `n_trials` empty trials whose parameters the
sampler fills in when a worker takes one (so it learns from every trial finished by then). Workers take
WAITING trials atomically, so no point runs twice however many workers or machines share the study, and
the budget is a total across restarts. A trial whose worker died is failed and re-enqueued with the same
parameters (Optuna's retry convention: system attributes `failed_trial`, `retry_history`); its run
directory moves to the new trial number and training continues from its checkpoint.pt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from sae_sweep.sweep import optuna_adapter as oa
from sae_sweep.sweep.store import HEARTBEAT_ATTR, OWNER_ATTR, StudyStore, running_trials, this_process

GRID_ATTR = "grid_point"  # user attr: index of a grid point
SLOT_ATTR = "budget_slot"  # user attr: index of a Bayesian trial in the budget
STATUS_ATTR = "status"  # user attr: completed | pruned | collapsed | diverged | failed | interrupted
REASON_ATTR = "reason"
IDENTITY_ATTR = "sae_sweep:identity"  # study user attr: what the sweep is (checked on every start)
READY_ATTR = "sae_sweep:ready"  # study user attr: the queue is complete


def is_retry(t: FrozenTrial) -> bool:
    return "failed_trial" in t.system_attrs


def enqueue_missing(study: optuna.Study, grid: list[dict[str, Any]] | None, n_trials: int) -> int:
    """Enqueue the grid points (or budget slots) not yet in the study; returns how many were added.

    Idempotent, so a creator killed half-way is completed by the next command.
    """
    trials = study.get_trials(deepcopy=False)
    if grid is not None:
        have = {t.user_attrs.get(GRID_ATTR) for t in trials}
        missing = [i for i in range(len(grid)) if i not in have]
        for i in missing:
            study.enqueue_trial(grid[i], user_attrs={GRID_ATTR: i})
        return len(missing)
    slots = sorted(t.user_attrs[SLOT_ATTR] for t in trials if SLOT_ATTR in t.user_attrs and not is_retry(t))
    start = slots[-1] + 1 if slots else 0
    for i in range(start, max(start, n_trials - len(slots) + start)):
        study.enqueue_trial({}, user_attrs={SLOT_ATTR: i})
    return max(0, n_trials - len(slots))


def _started_slots(trials: list[FrozenTrial]) -> int:
    return sum(
        1 for t in trials if SLOT_ATTR in t.user_attrs and not is_retry(t) and t.state != TrialState.WAITING
    )


def claim(study: optuna.Study, store: StudyStore, raw: BaseStorage, n_trials: int | None) -> int | None:
    """Take one WAITING trial (retries first, then in order) and mark it RUNNING; None if none is left.

    `n_trials` caps the budget slots started (a budget lowered on a re-run); retries are always taken.
    The trial gets its first heartbeat, then its owner, at once: a worker killed in between leaves a
    trial StudyStore.stale still recognises. Call under StudyStore.lock().
    """
    taken = claim_many(study, store, raw, n_trials, limit=1)
    return taken[0] if taken else None


def claim_many(
    study: optuna.Study,
    store: StudyStore,
    raw: BaseStorage,
    n_trials: int | None,
    limit: int,
    accept: Callable[[FrozenTrial], bool] | None = None,
) -> list[int]:
    """Take up to `limit` WAITING trials that `accept` (all, if None), as `claim` takes one."""
    trials = study.get_trials(deepcopy=False)
    waiting = sorted(
        (t for t in trials if t.state == TrialState.WAITING), key=lambda t: (not is_retry(t), t.number)
    )
    started = _started_slots(trials)
    taken: list[int] = []
    for t in waiting:
        if len(taken) >= limit:
            break
        is_slot = SLOT_ATTR in t.user_attrs and not is_retry(t)
        if n_trials is not None and is_slot and started >= n_trials:
            continue
        if accept is not None and not accept(t):
            continue
        try:
            tid = oa.trial_id(t)
            if oa.set_state(study, tid, TrialState.RUNNING):
                store.beat(raw, tid)
                oa.set_trial_system_attr(study, tid, OWNER_ATTR, this_process())
                taken.append(tid)
                started += is_slot
        except UpdateFinishedTrialError:
            continue
    return taken


def release(study: optuna.Study, tid: int) -> bool:
    """Put a trial this process holds back in the queue (RUNNING -> WAITING), its owner cleared, for
    another worker to take and resume from its checkpoint; False if it is no longer this process's
    (taken over). Call under StudyStore.lock(), after the trial's checkpoint is written."""
    t = oa.get_trial(study, tid)
    if t.state != TrialState.RUNNING or t.system_attrs.get(OWNER_ATTR) != this_process():
        return False
    try:
        oa.set_trial_system_attr(study, tid, OWNER_ATTR, None)
        return oa.set_state(study, tid, TrialState.WAITING)
    except UpdateFinishedTrialError:
        return False


def known_params(t: FrozenTrial) -> dict[str, Any] | None:
    """The parameters a WAITING trial will run with, if fixed before it starts (a grid point or a retry);
    None for a search's budget slot, whose sampler picks them when a worker takes it."""
    if t.params:
        return dict(t.params)
    if SLOT_ATTR in t.user_attrs:
        return None
    return dict(t.system_attrs.get("fixed_params", {}))


def retry(study: optuna.Study, t: FrozenTrial) -> None:
    """Re-enqueue a failed trial's parameters as a new WAITING trial that continues its run."""
    history = [*t.system_attrs.get("retry_history", []), t.number]
    system_attrs = {k: v for k, v in t.system_attrs.items() if k not in (OWNER_ATTR, HEARTBEAT_ATTR)}
    system_attrs.update(failed_trial=history[0], retry_history=history)
    user_attrs = {k: t.user_attrs[k] for k in (GRID_ATTR, SLOT_ATTR) if k in t.user_attrs}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=t.params,
            distributions=t.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )


def retry_failed(study: optuna.Study) -> list[FrozenTrial]:
    """Re-enqueue every failed trial (status `failed`: an error, not a divergence) that no later trial
    retries yet, so a re-run of the command tries again once the cause (data, disk, environment) is
    gone; returns the trials retried. Call under the fill lock."""
    trials = study.get_trials(deepcopy=False)
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    failed = [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and t.user_attrs.get(STATUS_ATTR, "failed") == "failed"
        and t.number not in superseded
    ]
    for t in failed:
        retry(study, t)
    return failed


def fail_and_retry(study: optuna.Study, t: FrozenTrial, reason: str) -> bool:
    """Mark a running trial interrupted (FAIL) and re-enqueue it; False if another process got there first."""
    tid = oa.trial_id(t)
    try:
        oa.set_trial_user_attr(study, tid, STATUS_ATTR, "interrupted")
        oa.set_trial_user_attr(study, tid, REASON_ATTR, reason)
        if not oa.set_state(study, tid, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry(study, oa.get_trial(study, tid))
    return True


def recover(study: optuna.Study, store: StudyStore, raw: BaseStorage) -> list[int]:
    """Fail and re-enqueue running trials whose worker is gone; returns their numbers. Call under the lock."""
    recovered = []
    for t in store.stale(raw, study, running_trials(study)):
        if fail_and_retry(study, t, "its worker stopped (process gone or no heartbeat); resumed by a retry"):
            recovered.append(t.number)
    return recovered


def pending(study: optuna.Study, n_trials: int | None) -> tuple[int, int]:
    """(trials a worker could still take, trials running now)."""
    trials = study.get_trials(deepcopy=False)
    started = _started_slots(trials)
    takeable = 0
    for t in trials:
        if t.state != TrialState.WAITING:
            continue
        if n_trials is not None and SLOT_ATTR in t.user_attrs and not is_retry(t):
            if started + takeable >= n_trials:
                continue
        takeable += 1
    return takeable, sum(1 for t in trials if t.state == TrialState.RUNNING)
