"""The live workers of a study, wherever they run: each registers in the study, beats while it lives, and
leaves when it stops, so every worker can size its share of the waiting trials.

A worker's entry is a study system attribute `sae_sweep:worker:<host>:<pid>:<start>` holding its host,
process, SLURM job id (if any), the wall-clock time of its last beat, how many trials it is waiting to be
released to it (`want`, sweep/rebalance.py) and, once it has stopped, when it left. A worker counts as
live while it has not left, its last beat is within the study's grace period, and (on the same machine)
its process still exists. A killed worker never leaves; its entry goes stale.

The share: a worker that is about to train claims at most ceil((waiting + running) / live workers) trials
counting the ones it holds, so the trials of a grid split evenly among the workers present when they are
claimed, a late joiner gets a share of what is still waiting, and a dead worker's share returns to the
queue with its trials. A worker that joins after the others have claimed their packs gets its share from
them: they release pack members to it (sweep/rebalance.py). Workers started together can also wait until
all have joined (`sweep.wait_for_workers`) so that none claims before the others are counted.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import optuna

from sae_sweep.sweep import optuna_adapter as oa
from sae_sweep.sweep.store import StudyStore, owner_is_gone, this_process

WORKER_PREFIX = "sae_sweep:worker:"


def _key(me: dict[str, Any]) -> str:
    return f"{WORKER_PREFIX}{me['host']}:{me['pid']}:{me['start']}"


def workers(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Every worker entry the study holds (live, stale or left), by key."""
    return {k: v for k, v in oa.study_system_attrs(study).items() if k.startswith(WORKER_PREFIX)}


def is_live(entry: dict[str, Any], grace_s: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if entry.get("left") is not None:
        return False
    if now - float(entry.get("beat", 0.0)) > grace_s:
        return False
    return not owner_is_gone(entry)


def live_workers(study: optuna.Study, grace_s: float) -> list[dict[str, Any]]:
    now = time.time()
    return [e for e in workers(study).values() if is_live(e, grace_s, now)]


def wanted_by_others(study: optuna.Study, grace_s: float, me: str) -> int:
    """Trials the other live workers are waiting to be released to them."""
    now = time.time()
    return sum(
        int(e.get("want") or 0) for k, e in workers(study).items() if k != me and is_live(e, grace_s, now)
    )


def share(waiting: int, running: int, live: int) -> int:
    """Trials a worker holding none may claim: an even split of all the unfinished work among the live
    workers, at least one while any is waiting."""
    if waiting <= 0:
        return 0
    return min(waiting, max(1, math.ceil((waiting + running) / max(1, live))))


class Registration:
    """This process's entry in the study's roster: joined on enter, beaten from a thread, left on exit."""

    def __init__(self, study: optuna.Study, store: StudyStore) -> None:
        self.study, self.store = study, store
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")  # submitit jobs
        self.me = {**this_process(), "job": job}
        self.key = _key(self.me)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="roster-heartbeat", daemon=True)
        self._failed = False
        self.want = 0

    def beat(self, left: bool = False) -> None:
        entry = {**self.me, "beat": time.time(), "want": self.want, "left": time.time() if left else None}
        oa.set_study_system_attr(self.study, self.key, entry)

    def ask(self, want: int) -> None:
        """Say how many trials this worker is waiting to be released to it (0: none)."""
        if want != self.want:
            self.want = want
            self.beat()

    def _run(self) -> None:
        while not self._stop.wait(self.store.heartbeat_s):
            try:
                self.beat()
                self._failed = False
            except Exception as err:  # a database hiccup: the next beat retries (say so once)
                if not self._failed:
                    print(f"[sweep] could not record this worker's heartbeat: {err}", flush=True)
                self._failed = True

    def live(self) -> int:
        """Live workers of the study, this one included."""
        return max(1, len(live_workers(self.study, self.store.grace_s)))

    def wait_for(self, n: int, poll_s: float = 0.2) -> int:
        """Wait until `n` workers are live (at most the grace period); returns how many are."""
        deadline = time.monotonic() + self.store.grace_s
        live = self.live()
        while live < n and time.monotonic() < deadline:
            time.sleep(poll_s)
            live = self.live()
        return live

    def __enter__(self) -> Registration:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.want = 0
            self.beat(left=True)
        except Exception:  # the storage is gone: the entry goes stale instead
            pass
