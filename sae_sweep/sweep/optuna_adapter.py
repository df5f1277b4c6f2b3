"""Every use of Optuna beyond its public API, in one place.

The sweep treats the study as a work queue shared by processes, which needs a few storage-level calls
Optuna keeps private: a trial's storage id, changing a trial's state outside `study.optimize`, writing a
running trial's system attributes, study system attributes (the worker registry), and the RDB storage's
stale-heartbeat query. They are stable across the Optuna 4-5 releases this package was written against;
tests/test_sweep_optuna_adapter.py exercises each one against every storage kind, so a release that
changes one fails that test by name instead of wedging a sweep.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState

# (object, attribute) pairs this module relies on; check() names any a release has dropped.
RELIED_ON = (
    (optuna.Study, "_storage"),
    (optuna.Study, "_study_id"),
    (FrozenTrial, "_trial_id"),
    (Trial, "_trial_id"),
    (RDBStorage, "_get_stale_trial_ids"),
    (BaseStorage, "set_trial_state_values"),
    (BaseStorage, "set_trial_system_attr"),
    (BaseStorage, "set_trial_user_attr"),
    (BaseStorage, "set_study_system_attr"),
    (BaseStorage, "get_study_system_attrs"),
    (BaseStorage, "get_trial"),
)


def check() -> list[str]:
    """The relied-on attributes missing from the installed Optuna (empty when all are there).

    Instance attributes (`_storage`, `_trial_id`, ...) are looked up on a throwaway in-memory study."""
    study = optuna.create_study()
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    instances: dict[type, object] = {optuna.Study: study, Trial: trial, FrozenTrial: frozen}
    missing = []
    for owner, name in RELIED_ON:
        target = instances.get(owner, owner)
        if not hasattr(target, name):
            missing.append(f"{owner.__module__}.{owner.__qualname__}.{name}")
    return missing


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: FrozenTrial | Trial) -> int:
    return trial._trial_id


def get_trial(study: optuna.Study, tid: int) -> FrozenTrial:
    return study._storage.get_trial(tid)


def set_state(study: optuna.Study, tid: int, state: TrialState) -> bool:
    """Move a trial to `state`; False if another process changed it first (WAITING -> RUNNING race).
    Raises optuna.exceptions.UpdateFinishedTrialError for a finished trial."""
    return study._storage.set_trial_state_values(tid, state)


def set_trial_system_attr(study: optuna.Study, tid: int, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(tid, key, value)


def set_trial_user_attr(study: optuna.Study, tid: int, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(tid, key, value)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def stale_trial_ids(storage: BaseStorage, study: optuna.Study) -> set[int]:
    """RDB storages: running trials whose Optuna heartbeat stopped (by the database's clock)."""
    if not isinstance(storage, RDBStorage):
        return set()
    return set(storage._get_stale_trial_ids(study._study_id))
