"""The Optuna internals the sweep relies on (sweep/optuna_adapter.py), against every storage kind: an
Optuna release that renames or changes one fails here, by name, instead of wedging a sweep."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sae_sweep.sweep import optuna_adapter as oa

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_every_relied_on_attribute_exists():
    assert oa.check() == [], f"this Optuna ({optuna.__version__}) lacks what sae_sweep relies on"


@pytest.fixture(params=["memory", "sqlite", "journal"])
def study(request, tmp_path) -> optuna.Study:
    if request.param == "memory":
        storage = None
    elif request.param == "sqlite":
        storage = RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2)
    else:
        storage = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
    return optuna.create_study(storage=storage, directions=["minimize", "minimize"])


def test_the_queue_operations_behave_as_the_sweep_expects(study):
    study.enqueue_trial({"x": 1.0})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    tid = oa.trial_id(waiting)
    assert isinstance(tid, int) and oa.get_trial(study, tid).number == waiting.number
    assert oa.set_state(study, tid, TrialState.RUNNING) is True  # the claim
    assert oa.set_state(study, tid, TrialState.RUNNING) is False  # a second claimer loses
    oa.set_trial_system_attr(study, tid, "k", {"a": 1})
    oa.set_trial_user_attr(study, tid, "status", "running")
    got = oa.get_trial(study, tid)
    assert got.system_attrs["k"] == {"a": 1} and got.user_attrs["status"] == "running"
    assert oa.set_state(study, tid, TrialState.FAIL) is True
    with pytest.raises(UpdateFinishedTrialError):  # how a worker learns its trial was taken over
        oa.set_trial_system_attr(study, tid, "k", 2)
    oa.set_study_system_attr(study, "sae_sweep:worker:x", {"beat": 1.0})
    assert oa.study_system_attrs(study)["sae_sweep:worker:x"] == {"beat": 1.0}
    assert oa.storage_of(study) is not None and isinstance(oa.study_id(study), int)


def test_stale_heartbeats_are_found_on_rdb_storages(study):
    study.enqueue_trial({})
    tid = oa.trial_id(study.get_trials()[0])
    oa.set_state(study, tid, TrialState.RUNNING)
    storage = oa.storage_of(study)
    if not isinstance(storage, RDBStorage):
        assert oa.stale_trial_ids(storage, study) == set()
        return
    storage.record_heartbeat(tid)
    assert oa.stale_trial_ids(storage, study) == set()
    deadline = time.time() + 30
    while tid not in oa.stale_trial_ids(storage, study):  # the grace period (2 s) passes
        assert time.time() < deadline, "a silent trial never went stale"
        time.sleep(0.2)
