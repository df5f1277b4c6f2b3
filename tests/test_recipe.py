"""The budget-aware recipe (lr from the architecture, width, k and steps), lr_scale, the lr_check saved
sweep, and the one-line note for a relu l1_lambda too small to do anything."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_sweep_run import small_args

from sae_sweep import recipe
from sae_sweep.config import resolve_recipe, validate
from sae_sweep.errors import ConfigError
from sae_sweep.models import architecture
from sae_sweep.sweep import driver, saved
from sae_sweep.train import train


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fewer_steps_get_a_larger_lr_and_long_budgets_the_architectures_rule(arch: str) -> None:
    base = architecture(arch).default_lr(256, 2048)
    lrs = [resolve_recipe(arch, 256, 2048, None, None, steps=s, k=16)[2] for s in (1000, 4000, 16000)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(2 * lrs[1]) and lrs[-1] > base
    assert max(lrs) <= recipe.TOPK_LR_CAP
    assert resolve_recipe(arch, 256, 2048, None, None, steps=10**7, k=16)[2] == pytest.approx(base)
    assert resolve_recipe(arch, 256, 2048, None, None, k=16)[2] == base  # no steps known: long-budget rule
    assert resolve_recipe(arch, 256, 2048, None, 1e-5, steps=50, k=16)[2] == 1e-5  # the user's lr wins


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_penalty_architectures_keep_their_rule_at_every_budget(arch: str) -> None:
    # The built-in default run (relu, ~1000 steps) must not move: it is the MCC >= 0.9 reference.
    for steps in (50, 1000, 10**6):
        rule = architecture(arch).default_lr(256, 2048)
        assert resolve_recipe(arch, 256, 2048, None, None, steps=steps)[2] == rule


def test_the_run_records_the_recipe_lr_for_its_steps_and_lr_scale(make_cfg) -> None:
    cfg = make_cfg("topk", k=3, tokens=51_200, batch_size=512)  # 100 steps
    metrics = train(cfg)
    expected = resolve_recipe("topk", 32, 128, None, None, steps=100, k=3)[2]
    assert metrics["steps"] == 100 and metrics["lr"] == pytest.approx(expected)
    assert expected > architecture("topk").default_lr(32, 128)
    half = make_cfg("topk", k=3, tokens=51_200, batch_size=512, lr_scale=0.5, out_dir=cfg.out_dir + "-half")
    assert train(half)["lr"] == pytest.approx(expected / 2)
    given = make_cfg("topk", k=3, tokens=51_200, batch_size=512, lr=2e-3, out_dir=cfg.out_dir + "-given")
    assert train(given)["lr"] == 2e-3


def test_lr_scale_with_a_given_lr_is_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match="lr_scale.*1 when lr is set"):
        validate(make_cfg(lr=1e-3, lr_scale=2.0))
    with pytest.raises(ConfigError, match="lr_scale"):
        validate(make_cfg(lr_scale=0.0))


def test_lr_check_runs_lr_multiples_around_the_recipe_value(
    data_root: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "sweep"
    args = small_args(data_root, sweep_dir, tokens=20_480)  # 40 steps at batch 512
    assert driver.run(["lr_check", "model=topk", "model.k=3", *args]) == 0
    lrs = sorted(json.loads(p.read_text())["lr"] for p in (sweep_dir / "trials").glob("*/metrics.json"))
    recipe_lr = resolve_recipe("topk", 32, 64, None, None, steps=40, k=3)[2]
    assert lrs == pytest.approx([recipe_lr * m for m in (0.25, 0.5, 1, 2, 4)])
    assert "lr_check" in saved.available()


def test_notes_sized_l1_lambda_gets_one_line_with_its_equivalent() -> None:
    note = recipe.l1_lambda_note(1e-5, 128, 4096)
    assert note is not None and "\n" not in note
    assert "l1_lambda=1e-05 is too small" in note and "= 5.24" in note  # 1e-5 x 128 x 4096
    assert recipe.l1_lambda_note(0.0, 128, 4096) is None  # the dense baseline is deliberate
    assert recipe.l1_lambda_note(1.0, 128, 4096) is None
    assert recipe.notes_equivalent(1e-9, 3072, 8192) == pytest.approx(0.025166, rel=1e-4)


def test_a_run_says_so_before_training(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sae_sweep"):
        train(make_cfg(l1_lambda=1e-5, tokens=5120))
    notes = [r.getMessage() for r in caplog.records if "too small" in r.getMessage()]
    assert notes == [recipe.l1_lambda_note(1e-5, 32, 512)]


def test_a_sweep_says_so_once_per_value_before_training(
    data_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    args = small_args(data_root, tmp_path / "sweep", tokens=5120)
    assert driver.run(["l1_lambda=0,1e-9,1e-5,5", "seed=0,1", *args]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[sweep] note:")]
    assert len(lines) == 2 and "l1_lambda=1e-09" in lines[0] and "l1_lambda=1e-05" in lines[1]
    assert out.index("[sweep] note:") < out.index("[sweep] trial 0")
    header = next(line for line in out.splitlines() if line.lstrip().startswith("trial ")).split()
    assert header[header.index("dead_frac") + 1] == "pct_active_batch"  # relu: the notes' proxy beside it


def test_relu_sweep_table_shows_pct_active_beside_dead_frac() -> None:
    import pandas as pd

    from sae_sweep.sweep.summary import format_table

    def table(arch: str) -> str:
        row = dict(trial=0, status="completed", pareto=True, l1_lambda=1.0, fvu=0.1, l0=12.0)
        frame = pd.DataFrame([{**row, "dead_frac": 0.25, "pct_active_batch": 41.5, "architecture": arch}])
        frame.attrs["swept"] = ["l1_lambda"]
        return format_table(frame, ["fvu", "l0"])

    header = table("relu").splitlines()[0].split()
    assert header[header.index("dead_frac") + 1] == "pct_active_batch"
    assert "pct_active_batch" not in table("topk")  # the notes' proxy matters where a penalty sets sparsity
