"""A pack that follows the share as workers join.

A worker claims its pack from the share it sees when it claims (sweep/roster.py): alone, that is the
whole pack cap (up to 8 grid points). A worker that joins later and finds fewer trials waiting than its
share (ceil((waiting + running) / live workers)) while others hold more than theirs asks for the
difference in its roster entry (`want`) and waits, at most `sweep.grace_s` (`Joining`: before its first
claim, and again while its first pack is smaller than its share, as the share shrinks when yet another
worker joins). Every worker training a pack
looks at the roster between windows (at most every CHECK_S) and, when some live worker wants trials and
it holds more than its share, lets the excess go: the batch loop checkpoints those members and ends them
`Released` (train/loop.py), and the worker puts their trials back to WAITING (queue.release, under the
claim lock). The joiner then claims them as usual and resumes each from its checkpoint.

Why release running members rather than grow packs lazily: a pack trains every member on one pass over
shared batches from its first batch on, so a trial cannot join a pack that is already running; a member
let go at a window boundary, though, resumes from its checkpoint exactly where it stopped, and a resumed
run ends with the weights and curves of an uninterrupted one (in the joiner's pack the stream waits until
it reaches that member), so packing stays bit-for-bit.

Guarantees kept: a trial goes back to WAITING only after its checkpoint is on disk, only while this
process still owns it, and under the lock claims take, so one worker at a time trains it and it completes
once; it keeps its trial number and run directory. A worker killed mid-release leaves a RUNNING trial
that `recover` retries as before. Only a joining worker asks (until its first pack is claimed), so workers
that merely finish at different times near the end of a sweep do not pull trials from one another.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage

from sae_sweep.sweep.queue import pending, release
from sae_sweep.sweep.roster import Registration, wanted_by_others
from sae_sweep.sweep.store import OWNER_ATTR, Heartbeat, StudyStore, running_trials, this_process

CHECK_S = 0.5  # how often a training pack looks at the roster (a cheap read, between windows)
POLL_S = 0.2  # how often a joining worker looks for its released trials


def _owner_key(owner: dict[str, Any] | None) -> str:
    return json.dumps(owner, sort_keys=True)


@dataclass
class Holdings:
    """Who holds what of a study's unfinished work."""

    takeable: int  # WAITING trials a worker may take
    running: int
    live: int  # live workers, the asking one included
    held: Counter[str]  # running trials by owner (_owner_key)

    @property
    def fair(self) -> int:
        """Each live worker's share of the unfinished trials."""
        return max(1, math.ceil((self.takeable + self.running) / max(1, self.live)))

    def over(self, me: str) -> int:
        """Trials the other workers hold beyond their share."""
        return sum(max(0, n - self.fair) for owner, n in self.held.items() if owner != me)


def holdings(study: optuna.Study, n_trials: int | None, live: int) -> Holdings:
    takeable, running = pending(study, n_trials)
    held = Counter(_owner_key(t.system_attrs.get(OWNER_ATTR)) for t in running_trials(study))
    return Holdings(takeable, running, live, held)


class Joining:
    """A worker that has just joined, until its first pack is claimed: it waits for the other workers to
    release what it lacks of its share (at most sweep.grace_s in all)."""

    def __init__(
        self,
        study: optuna.Study,
        store: StudyStore,
        n_trials: int | None,
        roster: Registration,
        say: Callable[[str], None],
    ) -> None:
        self.study, self.store, self.n_trials, self.roster, self.say = study, store, n_trials, roster, say
        self.me = _owner_key(this_process())
        self.deadline = time.monotonic() + store.grace_s
        self._told = False

    def wait(self, have: int = 0, limit: int | None = None) -> bool:
        """While fewer trials wait than this worker lacks of its share (`have` held, at most `limit`) and
        others hold more than theirs, ask them for the difference and wait. Returns whether any trial is
        waiting after it had to wait (False when it did not: nothing more to claim)."""
        waited = False
        try:
            while True:
                h = holdings(self.study, self.n_trials, self.roster.live())
                target = h.fair if limit is None else min(limit, h.fair)
                need = min(h.over(self.me), target - have - h.takeable)
                if need <= 0 or time.monotonic() >= self.deadline:
                    return waited and h.takeable > 0
                if not self._told:
                    self.say(
                        f"{h.takeable} trials waiting, {target} this worker's share: asking the workers that "
                        f"claimed before it joined to release {need}"
                    )
                    self._told = True
                self.roster.ask(need)
                waited = True
                time.sleep(POLL_S)
        finally:
            self.roster.ask(0)


class Releaser:
    """The batch loop's release hook (train/loop.PackRelease) for one pack: lets members go while this
    worker holds more than its share and another live worker wants trials."""

    def __init__(
        self,
        study: optuna.Study,
        store: StudyStore,
        raw: BaseStorage,
        n_trials: int | None,
        roster: Registration,
        heartbeat: Heartbeat,
        trial_ids: list[int],
        on_released: Callable[[list[int]], None],
    ) -> None:
        self.study, self.store, self.raw, self.n_trials = study, store, raw, n_trials
        self.roster, self.heartbeat, self.trial_ids = roster, heartbeat, trial_ids
        self.on_released = on_released
        self.me = _owner_key(this_process())
        self._next_check = time.monotonic() + CHECK_S

    def choose(self, active: list[int]) -> list[int]:
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + CHECK_S
        try:
            wanted = wanted_by_others(self.study, self.store.grace_s, self.roster.key)
            if wanted <= 0:
                return []
            h = holdings(self.study, self.n_trials, self.roster.live())
        except Exception:  # a database hiccup: keep training; the next check retries
            return []
        # the asker's `want` already counts what waits; holding no more than its share bounds each holder
        n = min(h.held[self.me] - h.fair, wanted, len(active) - 1)
        return active[-n:] if n > 0 else []

    def done(self, released: list[int]) -> None:
        ids = [self.trial_ids[i] for i in released]
        self.heartbeat.drop(ids)
        try:
            with self.store.lock():
                for tid in ids:
                    release(self.study, tid)
        except Exception as err:  # left RUNNING without a heartbeat: recovered after the grace period
            print(f"[sweep] could not put trial ids {ids} back in the queue: {err}", flush=True)
        self.on_released(released)
