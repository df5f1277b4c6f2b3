"""Sweeps across processes, for real: N workers and concurrent commands on SQLite and on a PostgreSQL
server started here, kill -9 mid-trial then the same command, and SLURM jobs (submitit's local cluster)."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from conftest import SMALL_DATA
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sae_sweep.config import DataConfig
from sae_sweep.data.synthetic import ensure_synthetic
from sae_sweep.sweep import optuna_adapter as oa
from sae_sweep.sweep.roster import workers as roster_workers
from sae_sweep.sweep.store import OWNER_ATTR, resolve_store

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def small_data(data_root) -> Path:
    """Generated once up front, so concurrent workers only read it."""
    ensure_synthetic(OmegaConf.structured(DataConfig(**SMALL_DATA, path=str(data_root))), progress=False)
    return data_root


def assert_all_succeeded(procs, outs: list[str]) -> None:
    """Every command exited 0. Each one's output is printed whole (pytest shows it when the test fails,
    and shortens an assert's message, while the line that says what went wrong is usually near its end)."""
    codes = [p.returncode for p in procs]
    for i, (code, out) in enumerate(zip(codes, outs, strict=True)):
        print(f"----- command {i} (pid {procs[i].pid}) exited {code}:\n{out}")
    assert codes == [0] * len(procs), [out[-1500:] for out in outs]


def command(data_root: Path, sweep_dir: Path, *args: str, tokens: int = 60_000) -> list[str]:
    """A sweep command with tiny trials; `args` come last, so they win over these defaults."""
    small = [f"data.{k}={v}" for k, v in SMALL_DATA.items()]
    return [
        sys.executable,
        "-m",
        "sae_sweep",
        "-m",
        *small,
        f"data.path={data_root}",
        "batch_size=512",
        "hidden_dim=64",
        f"tokens={tokens}",
        "device=cpu",
        "train.progress=false",
        "train.log_every_tokens=8192",
        "train.dead_window=100000",
        f"hydra.sweep.dir={sweep_dir}",
        "sweep.heartbeat_s=1",
        "sweep.grace_s=5",
        "sweep.report=false",
        *args,
    ]


def run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@functools.cache
def _storage(url: str) -> optuna.storages.BaseStorage:
    """One storage, so one connection pool, per database for the whole test process: a poll that opened
    a pool per look (e.g. while the study does not exist yet) left dozens of PostgreSQL connections open
    and the commands then hit the server's max_connections. Opened as the commands open it: on SQLite
    under their file lock, because opening an empty file creates Optuna's tables and a test creating
    them beside a command made that command fail ("table studies already exists")."""
    return resolve_store(url, Path("."), heartbeat_s=30, grace_s=120).open()


def load(storage: str, study_name: str | None = None) -> optuna.Study:
    """The study as the commands see it."""
    return optuna.load_study(study_name=study_name, storage=_storage(storage))


def assert_grid_done_once(study: optuna.Study, key: str, values: list) -> list[optuna.trial.FrozenTrial]:
    """Every point COMPLETE exactly once; no point started twice except as a retry of a dead attempt."""
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params[key] for t in complete) == sorted(values), [
        (t.number, t.state, t.params) for t in trials
    ]
    firsts = Counter(t.params[key] for t in trials if "failed_trial" not in t.system_attrs)
    assert set(firsts.values()) == {1}, firsts
    return complete


def owners(trials) -> set[int]:
    return {t.system_attrs[OWNER_ATTR]["pid"] for t in trials}


def test_workers_on_sqlite_share_the_grid(small_data, tmp_path):
    sweep = tmp_path / "sweep"
    run(command(small_data, sweep, "seed=0,1,2,3,4,5", "sweep.workers=2"), tmp_path)
    complete = assert_grid_done_once(load(f"sqlite:///{sweep / 'study.db'}"), "seed", list(range(6)))
    assert len(owners(complete)) == 2  # both worker processes took trials


def wait_for_workers(storage: str, study_name: str | None, n: int, procs, timeout: float = 180) -> None:
    """Until `n` workers have registered in the study (or a command ended early: it then fails the test)."""
    deadline = time.time() + timeout
    study = None  # loaded once: each load opens a connection pool (PostgreSQL has max_connections)
    while time.time() < deadline:
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, f"a command ended before the others joined: {ended[0].communicate()[0][-3000:]}"
        try:
            study = study or load(storage, study_name)
            if len(roster_workers(study)) >= n:
                return
        except (KeyError, ValueError, sqlalchemy.exc.OperationalError):  # not created yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} workers registered in {timeout} s")


# Long enough that a pack of 8 is still training when a copy started after it joins (seconds, loaded)
LATE_JOIN_TOKENS = 150_000
# With three commands the third starts only once the second holds its pack, after a Python start-up of
# its own: the first's pack must still be training then, so these trials are twice as long (the same
# ratio under load: start-up and training are both CPU-bound).
LATE_JOIN_TOKENS_3 = 300_000


def per_command(trials) -> Counter:
    return Counter(t.system_attrs[OWNER_ATTR]["pid"] for t in trials)


def test_two_copies_of_a_command_split_the_grid(small_data, tmp_path):
    """The second copy starts once the first has registered (it is then waiting for a second worker):
    each trains an even share of the 12 points, packed within its share."""
    sweep = tmp_path / "sweep"
    seeds = ",".join(str(i) for i in range(12))
    cmd = command(small_data, sweep, f"seed={seeds}", "sweep.wait_for_workers=2", "sweep.grace_s=120")
    storage = f"sqlite:///{sweep / 'study.db'}"
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_workers(storage, None, 1, [first])
    second = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [first, second]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert_all_succeeded(procs, outs)
    complete = assert_grid_done_once(load(storage), "seed", list(range(12)))
    ran = per_command(complete)
    assert set(ran) == {p.pid for p in procs} and min(ran.values()) >= 5, (ran, outs)
    assert all("12 completed" in out for out in outs)
    left = list(roster_workers(load(storage)).values())
    assert len(left) == 2 and all(e["left"] is not None for e in left)  # both left the roster at their end


def wait_for_pack(storage: str, study_name: str | None, proc, n: int, timeout: float = 180) -> None:
    """Until command `proc` holds `n` RUNNING trials (it has claimed its first pack)."""
    deadline = time.time() + timeout
    study = None  # loaded once: each load opens a connection pool (PostgreSQL has max_connections)
    while time.time() < deadline:
        assert proc.poll() is None, (
            f"the command ended before it claimed a pack: {proc.communicate()[0][-3000:]}"
        )
        try:
            study = study or load(storage, study_name)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if sum(1 for t in running if (t.system_attrs.get(OWNER_ATTR) or {}).get("pid") == proc.pid) >= n:
                return
        except (KeyError, ValueError, sqlalchemy.exc.OperationalError):  # not created yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"command {proc.pid} did not claim a pack of {n} in {timeout} s")


def start_late_joiners(cmd: list[str], cwd: Path, storage: str, study_name: str | None, n: int) -> list:
    """A command alone claims an auto pack of 8 of the 12 points; only then does a copy start, and each
    further copy once the one before it holds its first pack (at least 4 of the 12), so every joiner
    finds the earlier workers training: the last one's share has to be released by all of them."""

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [start()]
    wait_for_pack(storage, study_name, procs[0], 8)
    for _ in range(n - 1):
        if len(procs) > 1:
            wait_for_pack(storage, study_name, procs[-1], 4)
        procs.append(start())
    return procs


def check_late_joiners_got_their_share(procs, storage: str, study_name: str | None, at_least: int) -> None:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert_all_succeeded(procs, outs)
    study = load(storage, study_name)
    complete = assert_grid_done_once(study, "seed", list(range(12)))
    assert not study.get_trials(states=(TrialState.FAIL,)), outs  # shrinking a pack is no failure
    ran = per_command(complete)
    assert set(ran) == {p.pid for p in procs} and min(ran.values()) >= at_least, (ran, outs)
    assert "released to a worker that joined" in outs[0], outs[0]
    # a joiner that finds its share waiting takes it; one that finds less asks the first command for it
    assert any("asking the workers that claimed before it joined" in out for out in outs[1:]), outs
    resumed = [
        json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())["resumed_from_tokens"]
        for t in complete
        if t.system_attrs[OWNER_ATTR]["pid"] != procs[0].pid
    ]
    assert max(resumed) > 0  # a released member continued from the checkpoint its first worker wrote
    assert all("Traceback" not in out for out in outs), outs


def test_a_copy_started_after_the_first_claimed_its_pack_gets_half_the_grid(small_data, tmp_path):
    """No barrier: the first copy, alone, claims an auto pack of 8 of 12 points; the second starts once
    that pack is claimed, asks for its share, and the first releases members to it (checkpointed, resumed
    by the second): each trains at least 5, every point exactly once."""
    sweep = tmp_path / "sweep"
    seeds = ",".join(str(i) for i in range(12))
    cmd = command(small_data, sweep, f"seed={seeds}", "sweep.grace_s=120", tokens=LATE_JOIN_TOKENS)
    storage = f"sqlite:///{sweep / 'study.db'}"
    procs = start_late_joiners(cmd, tmp_path, storage, None, 2)
    check_late_joiners_got_their_share(procs, storage, None, 5)


def test_kill_9_mid_trial_then_the_same_command_resumes(small_data, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = command(
        small_data,
        sweep,
        "seed=0,1,2,3",
        "sweep.workers=2",
        "batch_size=256",
        "train.checkpoint_every_s=0.2",
        tokens=300_000,
    )
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while not list(sweep.glob("trials/*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-trial
    proc.wait()
    storage = f"sqlite:///{sweep / 'study.db'}"
    before = {t.number: t.params for t in load(storage).get_trials(states=(TrialState.COMPLETE,))}
    assert load(storage).get_trials(states=(TrialState.RUNNING,)), "no trial was running"

    res = run(cmd, tmp_path)
    complete = assert_grid_done_once(load(storage), "seed", [0, 1, 2, 3])
    assert {t.number: t.params for t in complete if t.number in before} == before  # kept, not repeated
    resumed = [
        json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())["resumed_from_tokens"]
        for t in complete
        if "failed_trial" in t.system_attrs
    ]
    assert resumed and max(resumed) > 0, res.stdout  # the interrupted trial continued from its checkpoint
    assert "re-enqueued to resume" in res.stdout and "4 completed" in res.stdout


def pause_outside_a_write(proc, db: Path) -> None:
    """SIGSTOP `proc` at a moment it holds neither SQLite's write lock nor the sweep's claim lock: a process
    stopped inside a write blocks every other process on that file until it continues (SQLite's rule), and
    the test is about a worker paused while it trains."""
    for _ in range(1000):
        os.kill(proc.pid, signal.SIGSTOP)
        con = sqlite3.connect(db, timeout=0.0)
        try:
            with open(f"{db}.sae_sweep.lock", "a+") as fh:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(fh, fcntl.LOCK_UN)
            con.execute("BEGIN EXCLUSIVE")  # fails while it holds any lock, a reader's too
            con.rollback()
            return
        except (OSError, sqlite3.OperationalError):  # it is writing: let it finish, then try again
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.01)
        finally:
            con.close()
    raise AssertionError("the command was always inside a write when paused")


def test_a_paused_worker_whose_trial_was_taken_over_leaves_it_cleanly(small_data, tmp_path):
    """SIGSTOP a command mid-trial; a second copy takes its trial over once the heartbeat is silent for
    the grace period; on SIGCONT the first finds its trial gone, says so and ends without a traceback;
    the retry continues from the paused attempt's checkpoint."""
    sweep = tmp_path / "sweep"
    storage = f"sqlite:///{sweep / 'study.db'}"
    cmd = command(
        small_data, sweep, "seed=0,1", "sweep.pack=1", "train.checkpoint_every_s=0.2", tokens=400_000
    )
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not list(sweep.glob("trials/*/checkpoint.pt")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[0][-3000:]
    pause_outside_a_write(first, sweep / "study.db")
    try:
        paused = load(storage).get_trials(states=(TrialState.RUNNING,))
        assert len(paused) == 1
        second = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 180  # until the second has failed the paused trial and re-enqueued it
        while load(storage).get_trials()[paused[0].number].state == TrialState.RUNNING:
            assert time.time() < deadline and second.poll() is None, "the paused trial was not taken over"
            time.sleep(0.1)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    outs = [p.communicate(timeout=400)[0] for p in (first, second)]
    assert_all_succeeded([first, second], outs)
    assert "Traceback" not in outs[0] and "taken over by another worker" in outs[0], outs[0]
    complete = assert_grid_done_once(load(storage), "seed", [0, 1])
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == paused[0].number)
    # either copy may train the retry (the first, continued, can claim it before the second is ready);
    # whichever did went on from the paused attempt's checkpoint
    assert retry.system_attrs[OWNER_ATTR]["pid"] in (first.pid, second.pid)
    metrics = json.loads((Path(retry.user_attrs["run_dir"]) / "metrics.json").read_text())
    assert metrics["resumed_from_tokens"] > 0, outs


def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found and shutil.which("initdb") else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a Unix socket in a temporary directory."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[dev]')")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="sae_sweep_pg_"))
    as_user: dict = {}
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    data = root / "data"

    def pg(*args: str) -> None:
        subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            env=env,
            cwd=root,
            timeout=120,
            **as_user,
        )

    pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    opts = f"-k {root} -c listen_addresses='' -p 5432 -c fsync=off -c max_connections=50"
    pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}&port=5432"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_three_commands_at_once_on_postgresql_fill_the_queue_once(small_data, tmp_path, postgres_url):
    """Started together, the three race to create and fill the study: one fills it (under the server's
    advisory lock), every point is queued and trained exactly once, and each command trains its share."""
    sweep = tmp_path / "sweep"
    cmd = command(
        small_data,
        sweep,
        "seed=0,1,2,3,4,5,6,7,8",
        f"sweep.storage='{postgres_url}'",  # quoted: '?', '&' and '=' are Hydra syntax
        "sweep.study_name=pg_grid",
        "sweep.wait_for_workers=3",
        "sweep.grace_s=120",
    )
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert_all_succeeded(procs, outs)
    study = load(postgres_url, "pg_grid")
    grid_points = [
        t.user_attrs["grid_point"] for t in study.get_trials() if "failed_trial" not in t.system_attrs
    ]
    assert sorted(grid_points) == list(range(9))  # no point enqueued twice
    complete = assert_grid_done_once(study, "seed", list(range(9)))
    assert set(per_command(complete)) == {p.pid for p in procs}, outs  # every command trained a share
    assert sum("queued 9 trials" in out for out in outs) == 1
    assert not (sweep / "study.db").exists()


def test_copies_started_after_the_first_claimed_its_pack_share_it_on_postgresql(
    small_data, tmp_path, postgres_url
):
    """The same on the PostgreSQL server, with three commands: the second starts once the first holds
    its pack of 8, the third once the second holds its share; each trains at least 3 of the 12 points."""
    sweep = tmp_path / "sweep"
    seeds = ",".join(str(i) for i in range(12))
    cmd = command(
        small_data,
        sweep,
        f"seed={seeds}",
        f"sweep.storage='{postgres_url}'",
        "sweep.study_name=pg_late",
        "sweep.grace_s=120",
        tokens=LATE_JOIN_TOKENS_3,
    )
    procs = start_late_joiners(cmd, tmp_path, postgres_url, "pg_late", 3)
    check_late_joiners_got_their_share(procs, postgres_url, "pg_late", 3)


def test_slurm_launcher_submits_worker_jobs(small_data, tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[dev]')")
    sweep = tmp_path / "sweep"
    journal = tmp_path / "shared" / "study.journal"
    cmd = command(
        small_data,
        sweep,
        "seed=0,1,2,3",
        "sweep.launcher=slurm",
        "sweep.workers=2",
        f"sweep.storage={journal}",
        "sweep.slurm.cluster=local",
        "sweep.slurm.wait=true",
        tokens=30_000,
    )
    res = run(cmd, tmp_path)
    assert "submitted 2 worker jobs" in res.stdout
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(journal))))
    assert_grid_done_once(study, "seed", [0, 1, 2, 3])
    logs = list((sweep / "slurm").glob("*_0_log.out"))  # one per job, holding its worker's lines
    assert len(logs) == 2 and sum(p.read_text().count(": completed") for p in logs) == 4


def test_slurm_rerun_with_live_jobs_shows_progress_and_submits_nothing(small_data, tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[dev]')")
    sweep = tmp_path / "sweep"
    journal = tmp_path / "shared" / "study.journal"
    cmd = command(
        small_data,
        sweep,
        "seed=0,1,2,3",
        "sweep.launcher=slurm",
        "sweep.workers=2",
        "sweep.pack=1",
        f"sweep.storage={journal}",
        "sweep.slurm.cluster=local",
        tokens=100_000,
    )
    first = run(cmd, tmp_path)
    assert "submitted 2 worker jobs" in first.stdout
    again = run(cmd, tmp_path)  # the jobs are live (or done): no job is submitted for their work
    assert "submitted" not in again.stdout and "trial" in again.stdout  # the table, with progress
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from sae_sweep.sweep.slurm import JOB_PREFIX

    def study() -> optuna.Study:
        return optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(journal))))

    deadline = time.time() + 400
    while len(study().get_trials(states=(TrialState.COMPLETE,))) < 4:  # the jobs finish the sweep
        assert time.time() < deadline, "the jobs did not finish the sweep"
        time.sleep(0.5)
    last = run(cmd, tmp_path)
    assert "submitted" not in last.stdout and "4 completed" in last.stdout
    assert_grid_done_once(study(), "seed", [0, 1, 2, 3])
    jobs = [k for k in oa.study_system_attrs(study()) if k.startswith(JOB_PREFIX)]
    assert len(jobs) == 2 and len(list((sweep / "slurm").glob("*_0_log.out"))) == 2


def test_a_failed_slurm_job_is_named_with_its_error_and_the_command_fails(small_data, tmp_path, monkeypatch):
    """A worker job whose storage does not hold the study (as on a node that sees another disk) fails;
    the next command names it with its error and exits non-zero, once."""
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[dev]')")
    from sae_sweep.compose import Composer
    from sae_sweep.sweep import driver
    from sae_sweep.sweep.plan import make_plan
    from sae_sweep.sweep.slurm import record_jobs
    from sae_sweep.sweep.worker import WorkerSpec, run_worker

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    journal = tmp_path / "shared" / "study.journal"
    args = command(
        small_data,
        sweep,
        "seed=0,1",
        "sweep.launcher=slurm",
        f"sweep.storage={journal}",
        "sweep.slurm.cluster=local",
        "sweep.slurm.wait=true",
        tokens=30_000,
    )[4:]
    with Composer() as composer:
        study, _ = driver.prepare_study(make_plan(args, composer), composer)
    folder = tmp_path / "jobs"
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local")
    elsewhere = [a for a in args if not a.startswith("sweep.storage=")] + [
        f"sweep.storage={tmp_path / 'other' / 'study.journal'}"
    ]
    job = executor.submit(run_worker, WorkerSpec(elsewhere, str(tmp_path)))
    assert job.exception() is not None
    record_jobs(study, [job], folder, "local")
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", "-m", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"worker job {job.job_id} failed: KeyError" in res.stdout, res.stdout
    assert "2 completed" in res.stdout  # the jobs it submitted ran the sweep
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", "-m", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0 and "failed:" not in res.stdout, res.stdout  # reported once


def test_slurm_job_parameters_follow_the_config():
    from sae_sweep.compose import Composer
    from sae_sweep.sweep.plan import make_plan
    from sae_sweep.sweep.slurm import job_parameters

    slurm = [
        "sweep.slurm.partition=gpu",
        "sweep.slurm.gpus_per_node=1",
        "sweep.slurm.time_min=60",
        "+sweep.slurm.additional_parameters.constraint=a100",
    ]
    with Composer() as composer:
        plan = make_plan(
            ["seed=0,1", "sweep.launcher=slurm", "sweep.storage=/shared/s.journal", *slurm], composer
        )
    params = job_parameters(plan)
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 1 and params["timeout_min"] == 60
    assert params["slurm_additional_parameters"] == {"constraint": "a100"}
    assert params["name"] == f"sae_sweep-{plan.study_name}"
