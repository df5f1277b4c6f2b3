"""Saved sweep definitions (sweeps/*.yaml): runnable by name or path, overridable on the command line."""

from pathlib import Path

import pytest

from sae_sweep.errors import ConfigError, DataError
from sae_sweep.sweep import saved
from sae_sweep.sweep.space import parse_space

REPO_SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_every_shipped_definition_parses_into_a_search_space():
    files = sorted(REPO_SWEEPS.glob("*.yaml"))
    assert {p.stem for p in files} >= {"notes_grid", "topk_l0_frontier"}
    for path in files:
        overrides = saved.expand([str(path)])
        assert overrides and all("=" in o for o in overrides)
        parse_space(overrides)  # raises on anything Hydra's override grammar rejects


def test_the_notes_grid_holds_what_the_notes_tried():
    overrides = saved.expand(["notes_grid"])
    by_key = dict(o.split("=", 1) for o in overrides)
    assert set(by_key["l1_lambda"].split(",")) >= {"0", "1e-9", "1e-5", "5"}
    assert set(by_key["lr"].split(",")) == {"1e-2", "1e-3", "1e-4"}
    assert set(by_key["batch_size"].split(",")) == {"2048", "4096", "8192"}
    assert "20000" in by_key["hidden_dim"]


def test_command_line_keys_replace_the_files_values():
    overrides = saved.expand(["notes_grid", "hidden_dim=1024", "batch_size=2048,8192", "tokens=1000000"])
    by_key = dict(o.split("=", 1) for o in overrides)
    assert by_key["hidden_dim"] == "1024" and by_key["batch_size"] == "2048,8192"
    assert by_key["tokens"] == "1000000" and by_key["l1_lambda"].startswith("0,")
    assert len(overrides) == len(by_key)  # one override per key


def test_unknown_names_and_bad_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="notes_grid"):  # the message lists what exists
        saved.expand(["no_such_sweep"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("overrides: l1_lambda=1\n")
    with pytest.raises(DataError, match="overrides"):
        saved.expand([str(bad)])
    with pytest.raises(DataError, match="no such sweep definition"):
        saved.expand([str(tmp_path / "missing.yaml")])
