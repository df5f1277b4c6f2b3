"""rundir: the one atomic writer is durable and never leaves a torn file; the same-run check."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from sae_sweep import rundir
from sae_sweep.errors import ConfigError


def test_interrupted_writer_leaves_the_old_file_intact_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / rundir.METRICS
    rundir.write_json(path, {"status": "completed", "mse": 0.5})

    def dies_halfway(fh) -> None:
        fh.write(b'{"status": "compl')
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    with pytest.raises(KeyboardInterrupt):
        rundir.atomic_write(path, dies_halfway)
    assert json.loads(path.read_text()) == {"status": "completed", "mse": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.METRICS]


@pytest.mark.parametrize("free_mib, code", [(1, errno.ENOSPC), (10_000, errno.EIO)])
def test_a_writer_failing_without_an_oserror_is_one_naming_the_file(
    tmp_path: Path, monkeypatch, free_mib: int, code: int
) -> None:
    # torch.save on a full disk raises RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    path = rundir.write_text(tmp_path / "checkpoint.pt", "old")
    usage = shutil.disk_usage(tmp_path)._replace(free=free_mib * 2**20)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: usage)

    def failing(fh) -> None:
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20 vs 12")

    with pytest.raises(OSError) as caught:
        rundir.atomic_write(path, failing)
    assert caught.value.errno == code and caught.value.filename == str(path)
    assert "unexpected pos" in str(caught.value.strerror)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / rundir.CURVES
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rundir.write_csv(path, [{"tokens": 1, "mse": 0.25}, {"tokens": 2, "mse": 0.125}])
    expected = [("fsync", "file"), ("replace", rundir.CURVES)]
    if os.name == "posix":
        expected.append(("fsync", "dir"))
    assert events == expected
    assert path.read_text().splitlines() == ["tokens,mse", "1,0.25", "2,0.125"]


def test_temp_names_are_unique_per_call_and_name_the_process(tmp_path: Path) -> None:
    path = tmp_path / "trials.csv"
    a, b = rundir.temp_path(path), rundir.temp_path(path)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(f"trials.csv.{os.getpid()}-") and a.name.endswith(rundir.TEMP_SUFFIX)


def test_variants_round_trip(tmp_path: Path) -> None:
    rundir.write_text(tmp_path / "a.md", "héllo\n")
    assert (tmp_path / "a.md").read_text() == "héllo\n"
    rundir.write_json(tmp_path / "m.json", {"x": float("nan")})
    assert math.isnan(json.loads((tmp_path / "m.json").read_text())["x"])
    rundir.write_torch(tmp_path / rundir.CHECKPOINT, {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / rundir.CHECKPOINT)["w"], torch.arange(3))
    assert rundir.write_csv(tmp_path / "empty.csv", []) is None
    assert not (tmp_path / "empty.csv").exists()


def test_read_metrics_is_none_while_absent_or_unreadable(tmp_path: Path) -> None:
    assert rundir.read_metrics(tmp_path) is None
    (tmp_path / rundir.METRICS).write_text('{"status": "comp')
    assert rundir.read_metrics(tmp_path) is None
    rundir.write_json(tmp_path / rundir.METRICS, {"status": "completed"})
    assert rundir.read_metrics(tmp_path) == {"status": "completed"}


def test_same_run_ignores_device_and_progress_but_names_the_first_real_difference(tmp_path: Path) -> None:
    saved = {"lr": 0.001, "device": "cpu", "out_dir": "a", "train": {"progress": True, "steps": 3}}
    rundir.write_config(tmp_path / rundir.CONFIG, saved)
    rundir.check_same_run(tmp_path, {**saved, "device": "cuda", "out_dir": "b"})  # no error
    assert rundir.run_difference(saved, {**saved, "train": {"progress": False, "steps": 3}}) is None
    with pytest.raises(ConfigError, match=r"lr was 0.001, now 0.01"):
        rundir.check_same_run(tmp_path, {**saved, "lr": 0.01})
    assert rundir.run_difference(saved, {**saved, "train": {"progress": True, "steps": 4}}) == (
        "train.steps was 3, now 4"
    )


def test_a_fresh_directory_is_any_run(tmp_path: Path) -> None:
    rundir.check_same_run(tmp_path, {"lr": 1.0})  # nothing saved yet: no error


def test_a_config_from_the_single_model_schema_is_the_same_run(tmp_path: Path) -> None:
    # config.yaml of a relu run written when one schema held every architecture's model keys
    old = {"lr": 1e-3, "model": {"name": "relu", "k": None, "aux_k_coef": 0.03125, "dec_init_norm": None}}
    now = {"lr": 1e-3, "model": {"name": "relu", "dec_init_norm": None}}
    assert rundir.run_difference(old, now) is None
    assert rundir.run_difference(old, {**now, "model": {"name": "relu", "dec_init_norm": 0.2}}) == (
        "model.dec_init_norm was None, now 0.2"
    )
    assert rundir.run_difference(old, {"lr": 1e-3, "model": {"name": "topk", "k": 4}}) is not None
