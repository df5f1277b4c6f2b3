"""Checkpoints: a run resumes from a good one; an unreadable one is set aside with a warning naming it and
the run starts over (a single run and a sweep trial alike)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_sweep import rundir
from sae_sweep.train import train
from sae_sweep.train.checkpoint import KEYS, read_checkpoint, write_checkpoint

BAD = {
    "garbage text": lambda path: path.write_text("12 not a checkpoint\n"),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "another object": lambda path: torch.save([1, 2, 3], path),
    "missing keys": lambda path: torch.save({"model": {}}, path),
}


def good_state() -> dict:
    return {k: {"x": torch.ones(3)} for k in KEYS}


def test_a_good_checkpoint_reads_back(tmp_path):
    write_checkpoint(tmp_path, good_state())
    state = read_checkpoint(tmp_path)
    assert state is not None and torch.equal(state["model"]["x"], torch.ones(3))
    assert read_checkpoint(tmp_path / "nowhere") is None


@pytest.mark.parametrize("damage", sorted(BAD))
def test_an_unreadable_checkpoint_is_set_aside_with_a_warning(tmp_path, caplog, damage):
    write_checkpoint(tmp_path, good_state())
    path = tmp_path / rundir.CHECKPOINT
    BAD[damage](path)
    with caplog.at_level(logging.WARNING, logger="sae_sweep"):
        assert read_checkpoint(tmp_path) is None
    aside = tmp_path / (rundir.CHECKPOINT + ".corrupt")
    assert not path.exists() and aside.is_file()
    assert str(path) in caplog.text and str(aside) in caplog.text and "starts over" in caplog.text
    BAD["garbage text"](path)  # a second bad one does not overwrite the first one set aside
    assert read_checkpoint(tmp_path) is None and (tmp_path / (rundir.CHECKPOINT + ".corrupt.1")).is_file()


def test_a_single_run_on_a_garbage_checkpoint_starts_over(make_cfg, tmp_path, caplog):
    cfg = make_cfg(tokens=20_000)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CHECKPOINT).write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="sae_sweep"):
        metrics: dict[str, Any] = dict(train(cfg))
    assert metrics["status"] == "completed" and metrics["resumed_from_tokens"] == 0
    assert metrics["tokens"] >= 20_000 and "set aside" in caplog.text
    assert json.loads((run_dir / rundir.METRICS).read_text())["status"] == "completed"
    assert (run_dir / (rundir.CHECKPOINT + ".corrupt")).is_file()
