"""Where a study lives (SQLite file, PostgreSQL/MySQL server, journal file) and what it takes to share it.

Workers take trials from the study's queue. A server database makes taking a trial atomic with row locks
(Optuna's `SELECT ... FOR UPDATE`); SQLite ignores those and a journal file only orders appends, so for
them every queue change happens under a lock file beside the storage (POSIX `lockf`: released by the
kernel when its holder dies, and honoured over NFS).

A running trial proves its worker is alive with a heartbeat (Optuna's RDB heartbeat, stamped with the
database clock; a system attribute with the wall clock for journals) and names its process, so a trial
whose process is gone on this machine is recovered at once instead of after the grace period.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.pool
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from sae_sweep.errors import ConfigError, SaeSweepError
from sae_sweep.sweep import optuna_adapter as oa

OWNER_ATTR = "sae_sweep:owner"
HEARTBEAT_ATTR = "sae_sweep:heartbeat"
JOURNAL_SUFFIXES = (".journal", ".log")
FILL_LOCK_KEY = 0x5AE5_11EE  # the advisory lock id queue fills take on a server database


class StorageError(SaeSweepError):
    """The study storage exists but cannot be used."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"study storage '{where}' {problem}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True)
class StudyStore:
    url: str  # an SQLAlchemy URL, or a journal file path
    kind: str  # sqlite | server | journal
    heartbeat_s: int
    grace_s: int

    @property
    def shareable_across_machines(self) -> bool:
        return self.kind in ("server", "journal")

    def open(self) -> BaseStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.kind == "journal":
                Path(self.url).parent.mkdir(parents=True, exist_ok=True)
                try:
                    return JournalStorage(JournalFileBackend(self.url))
                except Exception as err:  # a damaged journal fails while Optuna replays it
                    raise StorageError(
                        self.url, f"is not a readable Optuna journal ({_first_line(err)})"
                    ) from None
            if self.kind == "sqlite":
                # Workers of one machine write the same file: wait for its lock rather than fail. The
                # tables are created on first open, which two processes must not do at once.
                with self.lock():
                    try:
                        return self._rdb({"connect_args": {"timeout": 120}})
                    except sqlalchemy.exc.SQLAlchemyError as err:
                        raise StorageError(
                            self.url.removeprefix("sqlite:///"),
                            f"is not a usable SQLite study database ({_first_line(err)}); move it away and "
                            "re-run: the runs in trials/ are reused",
                        ) from None
            for attempt in range(3):  # two machines creating the tables at once: one fails, then sees them
                try:
                    return self._rdb({"pool_pre_ping": True})
                except sqlalchemy.exc.SQLAlchemyError as err:
                    if attempt == 2:
                        first = str(err).strip().splitlines()[0]
                        raise ConfigError(
                            "sweep.storage", self.url, f"a database this machine can use ({first})"
                        ) from None
                    time.sleep(1.0 + attempt)
            raise AssertionError("unreachable")

    def _rdb(self, engine_kwargs: dict[str, Any]) -> RDBStorage:
        return RDBStorage(
            self.url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=self.heartbeat_s,
            grace_period=self.grace_s,
        )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise queue changes (claim, recover, enqueue) where the storage does not do it itself."""
        if self.kind == "server":
            yield
            return
        target = self.url.removeprefix("sqlite:///") if self.kind == "sqlite" else self.url
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target + ".sae_sweep.lock", "a+") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def fill_lock(self) -> Iterator[None]:
        """Serialise creating and filling a study's queue, on every kind of storage: commands started at
        once must not enqueue the same points twice. A server database gets an advisory lock (held by a
        connection of its own, released by the server if this process dies)."""
        if self.kind != "server":
            with self.lock():
                yield
            return
        dialect = self.url.split(":", 1)[0].split("+", 1)[0]
        if dialect not in ("postgresql", "mysql", "mariadb"):
            yield  # no advisory locks to use: the queue fill relies on the creator finishing first
            return
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                if dialect == "postgresql":
                    acquire = "SELECT pg_advisory_lock(:key)"
                    release = "SELECT pg_advisory_unlock(:key)"
                    params: dict[str, Any] = {"key": FILL_LOCK_KEY}
                else:
                    acquire, release = "SELECT GET_LOCK(:key, 600)", "SELECT RELEASE_LOCK(:key)"
                    params = {"key": f"sae_sweep:{FILL_LOCK_KEY}"}
                conn.execute(sqlalchemy.text(acquire), params)
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text(release), params)
        finally:
            engine.dispose()

    def beat(self, storage: BaseStorage, trial_id: int) -> None:
        if isinstance(storage, RDBStorage):
            storage.record_heartbeat(trial_id)
        else:
            storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def stale(
        self, storage: BaseStorage, study: optuna.Study, running: list[FrozenTrial]
    ) -> list[FrozenTrial]:
        """Running trials whose worker is gone: its process has ended here, or its heartbeat stopped, or
        it died while claiming the trial (no owner recorded, started more than the grace period ago)."""
        now = time.time()
        rdb = isinstance(storage, RDBStorage)
        silent = oa.stale_trial_ids(storage, study)
        for t in running:
            started = t.datetime_start.timestamp() if t.datetime_start else now
            if rdb:  # Optuna's check skips trials that never beat; a live claimer names itself at once
                if OWNER_ATTR not in t.system_attrs and now - started > self.grace_s:
                    silent.add(oa.trial_id(t))
            elif now - t.system_attrs.get(HEARTBEAT_ATTR, started) > self.grace_s:
                silent.add(oa.trial_id(t))
        return [
            t for t in running if oa.trial_id(t) in silent or owner_is_gone(t.system_attrs.get(OWNER_ATTR))
        ]


def resolve_store(storage: str | None, sweep_dir: Path, heartbeat_s: int, grace_s: int) -> StudyStore:
    """`sweep.storage` (null = SQLite in the sweep dir) as a StudyStore; relative paths from the cwd."""
    if storage is None:
        return StudyStore(f"sqlite:///{sweep_dir / 'study.db'}", "sqlite", heartbeat_s, grace_s)
    if storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///")).absolute()
        return StudyStore(f"sqlite:///{path}", "sqlite", heartbeat_s, grace_s)
    if "://" in storage:
        return StudyStore(storage, "server", heartbeat_s, grace_s)
    if storage.endswith(JOURNAL_SUFFIXES):
        return StudyStore(str(Path(storage).absolute()), "journal", heartbeat_s, grace_s)
    if storage.endswith((".db", ".sqlite")):
        return StudyStore(f"sqlite:///{Path(storage).absolute()}", "sqlite", heartbeat_s, grace_s)
    raise ConfigError(
        "sweep.storage",
        storage,
        "a postgresql:// or mysql:// URL, sqlite:///FILE.db, or a "
        "journal file ending in .journal or .log (e.g. on a disk all workers share)",
    )


# --- worker processes ------------------------------------------------------------------------------
def _machine() -> str:
    """Identifies the process table this process sees: a pid is only meaningful on the same machine and,
    in containers, in the same pid namespace (containers share the kernel's boot id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> dict[str, Any]:
    return {
        "machine": _machine(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
    }


def owner_is_gone(owner: dict[str, Any] | None) -> bool:
    if not owner or owner.get("machine") != _machine():
        return False  # another machine's worker: only its heartbeat can tell
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return owner.get("start") is not None and _start_time(pid) != owner["start"]


class Heartbeat:
    """Beats for running trials (one, or a pack's) from a background thread until they are told."""

    def __init__(self, store: StudyStore, storage: BaseStorage, trial_ids: int | list[int]) -> None:
        self.store, self.storage = store, storage
        self.trial_ids = [trial_ids] if isinstance(trial_ids, int) else list(trial_ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial_ids}", daemon=True)

    def _beat_all(self) -> None:
        for trial_id in list(self.trial_ids):
            try:
                self.store.beat(self.storage, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:  # taken over: its new worker beats for it
                self.drop([trial_id])
            except Exception as err:  # a database hiccup must not kill the trial; the next beat retries
                print(f"[sweep] heartbeat of trial id {trial_id} failed: {err}", flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.store.heartbeat_s):
            self._beat_all()

    def drop(self, trial_ids: list[int]) -> None:
        """Stop beating for these trials (released to another worker)."""
        self.trial_ids[:] = [t for t in self.trial_ids if t not in trial_ids]

    def __enter__(self) -> Heartbeat:
        for trial_id in self.trial_ids:
            self.store.beat(self.storage, trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
