"""The quality suite's smoke subset: it runs the default and the grid through sae_sweep and reports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import quality


def quick_suite(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quick_suite_compares_default_with_the_grids_best(tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = quick_suite(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((out / "quality.json").read_text())
    assert row["dataset"] == "quick-gt" and row["arch"] == "topk" and row["score"] == "mcc"
    lrs, batches = quality.QUICK_GRID
    grid = row["grid"]
    assert sorted((p["lr"], p["batch_size"]) for p in grid) == sorted((a, b) for a in lrs for b in batches)
    # One token budget for all; the best is the grid's best MCC, the gap measured from the default.
    budget = row["tokens"]
    assert all(p["steps"] == -(-budget // p["batch_size"]) for p in grid)
    assert row["best"]["mcc"] == max(p["mcc"] for p in grid)
    assert row["gap"] == row["best"]["mcc"] - row["default"]["mcc"]
    assert 0 < row["default"]["mcc"] <= 1 and row["default"]["l0"] == 3
    assert row["default"]["lr"] is not None  # the recipe's value, recorded by the run
    # the time comparison is with the best point trained alone, at its lr and batch size
    alone = row["best_alone"]
    assert (alone["lr"], alone["batch_size"]) == (row["best"]["lr"], row["best"]["batch_size"])
    assert row["default_not_slower"] == quality.not_slower(row["default"], alone)
    table = (out / "quality.md").read_text()
    assert "| quick-gt | topk | MCC |" in table and table in proc.stdout

    # Re-run under the same --out (finished runs are reused): pairs measured before, in other
    # invocations, stay in the results; this pair's row is replaced, not repeated.
    earlier = {**row, "dataset": "gt-earlier"}
    (out / "quality.json").write_text(json.dumps([earlier, row]))
    again = quick_suite(out)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = json.loads((out / "quality.json").read_text())
    assert [r["dataset"] for r in rows] == ["gt-earlier", "quick-gt"] and rows[1]["grid"] == grid
    assert "| gt-earlier | topk | MCC |" in (out / "quality.md").read_text()


def test_not_slower_means_no_more_work_or_seconds_within_5_percent() -> None:
    run = {"batch_size": 1024, "steps": 293, "train_seconds": 41.0}
    assert quality.not_slower(run, {**run, "train_seconds": 30.0})  # same batches and steps: same work
    assert quality.not_slower({**run, "batch_size": 2048, "steps": 147}, run)  # fewer, larger steps
    assert not quality.not_slower(run, {"batch_size": 2048, "steps": 147, "train_seconds": 30.0})
    assert quality.not_slower(run, {"batch_size": 4096, "steps": 74, "train_seconds": 40.0})


def test_help_and_list() -> None:
    assert "--quick" in (quality.__doc__ or "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--list"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert {"synthsaebench-16k", "minilm-l3", "smollm2-l15"} <= set(names)
    gt = [ds for ds in quality.DATASETS if ds.kind == "synthetic"]
    assert len(gt) >= 8
    d_in = [ds.data["d_in"] for ds in gt]
    ratio = [ds.data["n_features"] / ds.data["d_in"] for ds in gt]
    l0 = [ds.data["true_l0"] for ds in gt]
    assert min(d_in) == 64 and max(d_in) == 768 and min(ratio) == 4 and max(ratio) == 32
    assert min(l0) == 2 and max(l0) == 40


def test_unknown_data_set_is_one_clear_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown data set nope" in proc.stderr
