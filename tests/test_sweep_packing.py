"""Packed sweeps: trials that share data and batch size train on one pass over shared batches, each with
its own result (the same as unpacked), record, checkpoint and resume."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_sweep_run import load, small_args

from sae_sweep.sweep import driver
from sae_sweep.train.trainer import Trainer


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def weights_by_params(sweep_dir: Path) -> dict[tuple, dict]:
    out = {}
    for t in load(sweep_dir).get_trials():
        if t.state.name == "COMPLETE":
            key = tuple(sorted(t.params.items()))
            out[key] = load_file(str(Path(t.user_attrs["run_dir"]) / "sae.safetensors"))
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for point in a:
        for name in a[point]:
            assert (a[point][name] == b[point][name]).all(), (point, name)


def packs_logged(out: str) -> list[list[int]]:
    return [[int(n) for n in m.split(", ")] for m in re.findall(r"trials ([\d, ]+): packed", out)]


def test_a_grid_trains_in_one_pack_with_the_results_of_one_by_one(data_root, cwd, capsys):
    space = ["l1_lambda=0,1,3", "seed=0,1"]
    assert driver.run([*space, *small_args(data_root, cwd / "packed")]) == 0
    out = capsys.readouterr().out
    assert packs_logged(out) == [[0, 1, 2, 3, 4, 5]]
    assert "auto: up to 8 for a grid" in out
    assert driver.run([*space, *small_args(data_root, cwd / "single", **{"sweep.pack": 1})]) == 0
    assert packs_logged(capsys.readouterr().out) == []
    packed, single = weights_by_params(cwd / "packed"), weights_by_params(cwd / "single")
    assert len(packed) == 6
    assert_same_weights(packed, single)


def test_only_trials_that_share_batches_are_packed(data_root, cwd, capsys):
    command = ["lr=1e-3,3e-3,1e-2", *small_args(data_root, cwd / "s", batch_size="256,512")]
    assert driver.run(command) == 0
    packs = packs_logged(capsys.readouterr().out)
    trials = load(cwd / "s").get_trials()
    assert sorted(len(p) for p in packs) == [3, 3]
    assert sorted({trials[i].params["batch_size"] for i in p}.pop() for p in packs) == [256, 512]
    assert all(len({trials[i].params["batch_size"] for i in p}) == 1 for p in packs)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6


def test_sweep_pack_caps_the_pack_size(data_root, cwd, capsys):
    command = ["lr=1e-3,2e-3,3e-3,4e-3,5e-3", *small_args(data_root, cwd / "s", **{"sweep.pack": 2})]
    assert driver.run(command) == 0
    assert packs_logged(capsys.readouterr().out) == [[0, 1], [2, 3]]  # the last one runs alone
    assert [t.state.name for t in load(cwd / "s").get_trials()] == ["COMPLETE"] * 5


def test_a_search_packs_its_budget_slots(data_root, cwd, capsys):
    args = small_args(data_root, cwd / "s", **{"sweep.pruner": "none", "sweep.seed": 0, "sweep.n_trials": 6})
    assert driver.run(["lr=tag(log,interval(1e-4,1e-2))", "sweep=tpe", *args]) == 0
    assert packs_logged(capsys.readouterr().out) == [[0, 1, 2, 3], [4, 5]]
    trials = load(cwd / "s").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert len({t.params["lr"] for t in trials}) == 6  # each slot sampled its own point


def test_a_pruned_search_packs_once_the_pruner_has_its_references(data_root, cwd, capsys):
    args = small_args(
        data_root, cwd / "s", **{"sweep.pruner_startup_trials": 2, "sweep.seed": 0, "sweep.n_trials": 5}
    )
    assert driver.run(["lr=tag(log,interval(1e-4,1e-2))", "sweep=tpe", *args]) == 0
    out = capsys.readouterr().out
    assert packs_logged(out) == [[2, 3, 4]]


def test_an_interrupted_pack_resumes_every_member(data_root, cwd, monkeypatch, capsys):
    space = ["lr=1e-3,3e-3,1e-2"]
    real = Trainer._train_step
    calls = {"n": 0}

    def step(self, x, s):
        calls["n"] += 1
        if calls["n"] == 3 * 20 + 1:  # Ctrl-C in the 21st batch of the pack
            signal.raise_signal(signal.SIGINT)
        return real(self, x, s)

    command = [*space, *small_args(data_root, cwd / "s", **{"train.checkpoint_every_s": 1000})]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_step", step)
        assert driver.run(command) == 130
    trials = load(cwd / "s").get_trials()
    assert [t.state.name for t in trials] == ["FAIL"] * 3 + ["WAITING"] * 3
    assert all((cwd / "s" / "trials" / str(i) / "checkpoint.pt").is_file() for i in range(3))
    capsys.readouterr()
    assert driver.run(command) == 0
    out = capsys.readouterr().out
    assert packs_logged(out) == [[3, 4, 5]]
    trials = load(cwd / "s").get_trials()
    assert [t.state.name for t in trials[3:]] == ["COMPLETE"] * 3
    assert all(t.user_attrs["resumed_from_tokens"] > 0 for t in trials[3:])
    assert driver.run([*space, *small_args(data_root, cwd / "straight")]) == 0
    assert_same_weights(weights_by_params(cwd / "s"), weights_by_params(cwd / "straight"))
