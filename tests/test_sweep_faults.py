"""Faults a sweep meets in the wild: each gives one line naming the path (or the sweep goes on), no
trial is left RUNNING, and the same command finishes the sweep once the cause is gone."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import save_file
from test_sweep_run import load, patch_train, small_args, states

from sae_sweep import rundir
from sae_sweep.report import collect
from sae_sweep.sweep import driver
from sae_sweep.train import train as real_train

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path / "sweep"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sae_sweep: error:"), err
    assert "Traceback" not in err
    return lines[0]


def nothing_running(sweep_dir: Path) -> None:
    if (sweep_dir / "study.db").is_file() and (sweep_dir / "study.db").read_bytes().startswith(b"SQLite"):
        for name in optuna.study.get_all_study_names(f"sqlite:///{sweep_dir / 'study.db'}"):
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")
            assert not study.get_trials(states=(TrialState.RUNNING,))


# --- data -------------------------------------------------------------------------------------------
def shard_args(folder: Path, sweep_dir: Path) -> list[str]:
    return [
        "data=shards",
        f"data.path={folder}",
        "data.chunk_tokens=512",
        "batch_size=256",
        "hidden_dim=32",
        "tokens=8192",
        "device=cpu",
        "train.progress=false",
        "train.log_every_tokens=4096",
        f"hydra.sweep.dir={sweep_dir}",
        "sweep.report=false",
    ]


BAD_SHARDS = {
    "int32 .npy": ("bad.npy", lambda p: np.save(p, np.ones((1000, 16), dtype=np.int32))),
    "0-row .npy": ("bad.npy", lambda p: np.save(p, np.ones((0, 16), dtype=np.float32))),
    "two-tensor .safetensors": (
        "bad.safetensors",
        lambda p: save_file({"a": torch.ones(1000, 16), "b": torch.ones(1000, 16)}, str(p)),
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_SHARDS))
def test_bad_data_is_one_line_before_the_study_and_the_fixed_data_runs(sweep_dir, tmp_path, capsys, bad):
    folder = tmp_path / "shards"
    folder.mkdir()
    np.save(folder / "good.npy", np.random.default_rng(0).standard_normal((6000, 16)).astype(np.float32))
    name, write = BAD_SHARDS[bad]
    write(folder / name)
    command = ["lr=1e-3,3e-3", *shard_args(folder, sweep_dir)]
    assert driver.run(command) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(folder / name) in line
    assert not (sweep_dir / "study.db").exists()  # nothing queued
    (folder / name).unlink()  # the cause is gone: the same command runs the sweep
    assert driver.run(command) == 0
    trials = load(sweep_dir).get_trials()  # trained to the end (noise data: they may explain nothing)
    assert len(trials) == 2 and all(t.user_attrs["status"] in ("completed", "collapsed") for t in trials)
    assert all(t.user_attrs["tokens"] >= 8192 for t in trials)


def test_failed_trials_are_retried_by_the_same_command(data_root, sweep_dir, monkeypatch, capsys):
    broken = {"disk": True}

    def flaky(cfg, on_log=None):
        if broken["disk"] and cfg.lr == 1e-4:
            raise OSError(28, "No space left on device", str(Path(cfg.out_dir) / "sae.safetensors"))
        return real_train(cfg, on_log)

    patch_train(monkeypatch, flaky)
    command = ["lr=1e-3,1e-4", *small_args(data_root, sweep_dir)]
    assert driver.run(command) == 0
    assert [t.state for t in load(sweep_dir).get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    broken["disk"] = False
    capsys.readouterr()
    assert driver.run(command) == 0
    out = capsys.readouterr().out
    assert "trial 1 failed before (OSError: [Errno 28] No space left on device" in out and "retried" in out
    trials = load(sweep_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].params == trials[1].params
    assert driver.run(command) == 0 and len(load(sweep_dir).get_trials()) == 3  # retried once, not again


# --- the filesystem and the storage -----------------------------------------------------------------
def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("in the way\n")
    return path


FS_FAULTS = {
    "sweep dir is a file": lambda tmp, sweep: (_file(sweep), str(sweep)),
    "sweep dir under a file": lambda tmp, sweep: (_file(sweep.parent), str(sweep.parent)),
    "trials is a file": lambda tmp, sweep: (_file(sweep / "trials"), str(sweep / "trials")),
    "trials/0 is a file": lambda tmp, sweep: (_file(sweep / "trials" / "0"), str(sweep / "trials" / "0")),
    "outputs/data is a file": lambda tmp, sweep: (_file(tmp / "outputs" / "data"), "outputs/data"),
    "study.db is no database": lambda tmp, sweep: (_file(sweep / "study.db"), str(sweep / "study.db")),
}


@pytest.mark.parametrize("fault", sorted(FS_FAULTS))
def test_filesystem_and_storage_faults_are_one_line(data_root, tmp_path, monkeypatch, capsys, fault):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "s" / "sweep"
    if fault == "sweep dir under a file":
        sweep = tmp_path / "s" / "f" / "sweep"
    args = small_args(data_root, sweep)
    if fault == "outputs/data is a file":  # the default cache of generated data, relative to the cwd
        args = [a for a in args if not a.startswith("data.path=")]
    _, named = FS_FAULTS[fault](tmp_path, sweep)
    assert driver.run(["lr=1e-3,1e-4", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert named in line, line
    nothing_running(sweep)


def test_a_corrupt_checkpoint_is_set_aside_and_its_trial_restarts(data_root, sweep_dir, monkeypatch, caplog):
    def stop_after_a_checkpoint(cfg, on_log=None):
        def log(row):
            if on_log is not None:
                on_log(row)
            if (Path(cfg.out_dir) / rundir.CHECKPOINT).is_file():
                raise KeyboardInterrupt

        return real_train(cfg, log)

    patch_train(monkeypatch, stop_after_a_checkpoint)
    extra = {"sweep.pack": 1, "train.checkpoint_every_s": 0.01, "tokens": 60_000}
    command = ["lr=1e-3,1e-4", *small_args(data_root, sweep_dir, **extra)]
    assert driver.run(command) == 130
    checkpoint = sweep_dir / "trials" / "0" / rundir.CHECKPOINT
    assert checkpoint.is_file()
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    monkeypatch.undo()
    monkeypatch.chdir(sweep_dir.parent)
    with caplog.at_level(logging.WARNING, logger="sae_sweep"):
        assert driver.run(command) == 0
    assert "set aside" in caplog.text and "checkpoint.pt.corrupt" in caplog.text
    trials = load(sweep_dir).get_trials()
    assert sorted(t.params["lr"] for t in trials if t.state == TrialState.COMPLETE) == [1e-4, 1e-3]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    run_dir = Path(retry.user_attrs["run_dir"])
    assert (run_dir / (rundir.CHECKPOINT + ".corrupt")).is_file()
    assert json.loads((run_dir / rundir.METRICS).read_text())["resumed_from_tokens"] == 0  # started over


# --- trial directories and the study ----------------------------------------------------------------
def test_two_studies_never_share_a_sweep_directory(data_root, sweep_dir, capsys):
    args = small_args(data_root, sweep_dir)
    assert driver.run(["lr=1e-3,1e-4", *args]) == 0
    before = {p.name: (p / rundir.METRICS).read_text() for p in (sweep_dir / "trials").iterdir()}
    capsys.readouterr()
    assert driver.run(["lr=1e-3,3e-4", *args]) == 2  # a changed space: another derived study name
    line = one_error_line(capsys.readouterr().err)
    assert str(sweep_dir) in line and "holds the trials of study" in line and "0.0003" in line
    assert {p.name: (p / rundir.METRICS).read_text() for p in (sweep_dir / "trials").iterdir()} == before
    names = optuna.study.get_all_study_names(f"sqlite:///{sweep_dir / 'study.db'}")
    assert names == [load(sweep_dir).study_name]
    nothing_running(sweep_dir)


def test_a_deleted_study_is_rebuilt_from_the_trial_directories(data_root, sweep_dir, monkeypatch, capsys):
    calls: list[str] = []

    def interrupted_once(cfg, on_log=None):
        calls.append(cfg.out_dir)
        if len(calls) == 3:  # the third trial of the first command
            raise KeyboardInterrupt
        return real_train(cfg, on_log)

    patch_train(monkeypatch, interrupted_once)
    lrs = ",".join(f"{x:g}" for x in np.geomspace(1e-4, 1e-2, 12))
    command = [f"lr={lrs}", *small_args(data_root, sweep_dir, **{"sweep.pack": 1, "tokens": 8192})]
    assert driver.run(command) == 130
    assert driver.run(command) == 0  # the interrupted point continues as trial 12
    assert len(load(sweep_dir).get_trials()) == 13
    finished = {p.name: (p / rundir.METRICS).read_text() for p in (sweep_dir / "trials").iterdir()}
    (sweep_dir / "study.db").unlink()
    capsys.readouterr()
    assert driver.run(command) == 0
    assert "12 runs reused" in capsys.readouterr().out
    study = load(sweep_dir)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 12
    now = {p.name: (p / rundir.METRICS).read_text() for p in (sweep_dir / "trials").iterdir()}
    assert sorted(now.values()) == sorted(finished.values())  # the same runs, none trained again
    df = collect(sweep_dir, progress=False)
    assert len(df) == 12 and df["status"].eq("completed").all()


# --- results that are no result ---------------------------------------------------------------------
def test_an_fvu_of_one_or_more_is_collapsed_and_never_on_the_front(data_root, sweep_dir, capsys):
    args = small_args(data_root, sweep_dir, **{"model": "topk", "model.k": 4})
    assert driver.run(["lr=1e-3,10", *args]) == 0
    trials = {t.params["lr"]: t for t in load(sweep_dir).get_trials()}
    wild = trials[10]
    assert wild.state == TrialState.PRUNED and wild.user_attrs["status"] == "collapsed"
    assert "fvu" in wild.user_attrs["reason"] and wild.user_attrs["fvu"] >= 1
    metrics = json.loads((Path(wild.user_attrs["run_dir"]) / rundir.METRICS).read_text())
    assert metrics["status"] == "collapsed"
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "collapsed" in line}
    assert rows and all(not key.startswith("*") for key in rows)  # not starred in the table
    df = collect(sweep_dir, progress=False)
    assert not bool(df.loc[df["status"].eq("collapsed"), "pareto"].any())
    assert bool(df.loc[df["status"].eq("completed"), "pareto"].all())


def test_a_single_run_whose_fvu_is_one_or_more_stops_as_collapsed(make_cfg):
    from sae_sweep.errors import RunStopped, TrainingCollapsed

    cfg = make_cfg(model="topk", k=4, lr=10.0, hidden_dim=64, tokens=30_000)
    with pytest.raises(TrainingCollapsed, match="fvu"):
        real_train(cfg)
    assert json.loads((Path(cfg.out_dir) / rundir.METRICS).read_text())["status"] == "collapsed"
    with pytest.raises(RunStopped, match="collapsed"):  # the same command again: same verdict, no retraining
        real_train(cfg)


def test_a_run_that_cannot_write_its_checkpoint_is_one_line_and_the_same_command_finishes(
    data_root, tmp_path
):
    """A full disk under torch.save (its zip writer raises RuntimeError, not OSError): one line naming
    the checkpoint, exit 2, and the same command trains the run once the disk has room."""
    inject = tmp_path / "inject"  # torch.save fails in the command's own process, as on a full disk
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('SAE_SWEEP_TEST_FULL_DISK'):\n"
        "    import torch\n"
        "    def full_disk(*args, **kwargs):\n"
        "        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 20 vs 12')\n"
        "    torch.save = full_disk\n"
    )
    run_dir = tmp_path / "run"
    keep = [a for a in small_args(data_root, tmp_path / "unused") if not a.startswith(("hydra.", "sweep."))]
    cmd = [
        sys.executable,
        "-m",
        "sae_sweep",
        *keep,
        "train.checkpoint_every_s=0.001",
        f"hydra.run.dir={run_dir}",
    ]
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "SAE_SWEEP_TEST_FULL_DISK": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_error_line(res.stderr)
    assert f"'{run_dir / rundir.CHECKPOINT}'" in line and "unexpected pos" in line and "resumes" in line
    assert not list(run_dir.glob("*.tmp"))
    del env["SAE_SWEEP_TEST_FULL_DISK"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((run_dir / rundir.METRICS).read_text())["status"] == "completed"


# --- a sweep directory this user cannot write -----------------------------------------------------------
def _bound_by_file_modes(cmd: list[str]) -> list[str] | None:
    """`cmd` run so that file modes bind it. Tests usually run as root, whom modes do not stop (and the
    interpreter may sit in root's home, out of other users' reach): run it as root without the
    capabilities that bypass modes (setpriv). Another user needs nothing. None when neither works."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    return None if setpriv is None else [setpriv, "--bounding-set=-all", "--inh-caps=-all", *cmd]


def _make_read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


def _run_bound(args: list[str], probe: Path) -> subprocess.CompletedProcess:
    """The sweep command, bound by file modes; skips when that cannot be arranged here."""
    prefix = _bound_by_file_modes([sys.executable])
    if prefix is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: file modes cannot bind the command")
    can_write = subprocess.run(
        [*prefix, "-c", f"import os; print(os.access({str(probe)!r}, os.W_OK))"],
        capture_output=True,
        text=True,
    )
    if can_write.stdout.strip() != "False":
        pytest.skip(
            f"file modes do not bind this user here ({can_write.stdout.strip()} {can_write.stderr[-300:]})"
        )
    return subprocess.run(
        [*prefix, "-m", "sae_sweep", "-m", *args], capture_output=True, text=True, timeout=300
    )


def test_a_read_only_finished_sweep_shows_its_table(data_root, sweep_dir):
    args = small_args(data_root, sweep_dir, seed="0,1")
    assert driver.run(args) == 0
    _make_read_only(sweep_dir)
    res = _run_bound(args, sweep_dir)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "2 completed" in res.stdout, res.stdout
    # paths inside the working directory are shown relative to it, as the user would type them
    assert "report: not written (sweep is read-only)" in res.stdout, res.stdout


def test_a_read_only_sweep_with_work_left_is_one_line_and_runs_once_writable(data_root, sweep_dir, capsys):
    from sae_sweep.compose import Composer
    from sae_sweep.sweep.plan import make_plan

    args = small_args(data_root, sweep_dir, seed="0,1")
    with Composer() as composer:
        driver.prepare_study(make_plan(args, composer), composer)  # queued, none run
    _make_read_only(sweep_dir)
    res = _run_bound(args, sweep_dir)
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_error_line(res.stderr)
    assert str(sweep_dir) in line and "read-only" in line and "2 trials left to run" in line, line
    assert states(load(sweep_dir)) == ["WAITING", "WAITING"]  # nothing claimed, nothing left RUNNING
    for p in [sweep_dir, *sweep_dir.rglob("*")]:  # the cause removed: the same command runs the sweep
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert driver.run(args) == 0
    assert states(load(sweep_dir)) == ["COMPLETE", "COMPLETE"]
