"""The budget-aware recipe (lr from the architecture, width, k and steps; batch_size from the budget),
lr_scale, the lr_check saved sweep, and the one-line note for a relu l1_lambda too small to do anything."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_sweep_run import small_args

from sae_sweep import recipe
from sae_sweep.config import resolve_batch_size, resolve_recipe, validate
from sae_sweep.errors import ConfigError
from sae_sweep.models import architecture
from sae_sweep.sweep import driver, saved
from sae_sweep.train import train
from sae_sweep.train.loop import stream_key


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fewer_steps_get_a_larger_lr_and_long_budgets_the_architectures_rule(arch: str) -> None:
    base = architecture(arch).default_lr(256, 2048)
    lrs = [resolve_recipe(arch, 256, 2048, None, None, steps=s, k=16)[2] for s in (1000, 4000, 16000)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(2 * lrs[1]) and lrs[-1] > base
    assert max(lrs) <= 1e-2  # the TopK family's budget_lr_cap
    assert resolve_recipe(arch, 256, 2048, None, None, steps=10**7, k=16)[2] == pytest.approx(base)
    assert resolve_recipe(arch, 256, 2048, None, None, k=16)[2] == base  # no steps known: long-budget rule
    assert resolve_recipe(arch, 256, 2048, None, 1e-5, steps=50, k=16)[2] == 1e-5  # the user's lr wins


def test_wider_inputs_get_a_smaller_short_budget_lr_and_long_budgets_keep_the_rule() -> None:
    """Above d_in 128 the short-budget factor shrinks as sqrt(128 / d_in); Gao et al.'s rule itself
    (long budgets) is kept at every d_in."""
    steps, hidden = 300, 3072
    base = architecture("topk").default_lr(768, hidden)
    boosted = base * (recipe.LONG_BUDGET_STEPS / steps) ** 0.5
    at = {d: resolve_recipe("topk", d, hidden, None, None, steps=steps, k=24)[2] for d in (64, 128, 768)}
    assert at[64] == at[128] == pytest.approx(boosted)  # no d_in factor up to 128
    assert at[768] == pytest.approx(boosted * (128 / 768) ** 0.5)  # ~3.1e-3 at gt-d768-4x's shape
    assert resolve_recipe("topk", 768, hidden, None, None, steps=10**6, k=24)[2] == pytest.approx(base)
    relu = [resolve_recipe("relu", d, 8 * d, None, None, steps=steps)[2] for d in (128, 768)]
    assert relu == [RELU_CAP, RELU_CAP]  # relu: no d_in factor (its cap sets the lr at 64-256)


RELU_CAP = 3e-3  # relu's budget_lr_cap


def test_relu_lr_scales_with_the_budget_up_to_3e_3() -> None:
    assert architecture("relu").budget_lr_cap == RELU_CAP
    for d_in in (64, 256, 3072):
        rule = architecture("relu").default_lr(d_in, 8 * d_in)
        lrs = [resolve_recipe("relu", d_in, 8 * d_in, None, None, steps=s)[2] for s in (50, 1000, 10**6)]
        assert lrs[0] == pytest.approx(min(rule * 40, RELU_CAP))
        assert lrs[0] >= lrs[1] >= lrs[2] == pytest.approx(rule)
    assert resolve_recipe("relu", 128, 1024, None, None, steps=977)[2] == RELU_CAP  # the default run
    assert resolve_recipe("relu", 256, 2048, None, 1e-4, steps=50)[2] == 1e-4  # the user's lr wins


def test_jumprelu_keeps_its_rule_at_every_budget() -> None:
    for steps in (50, 1000, 10**6):  # not measured at short budgets
        rule = architecture("jumprelu").default_lr(256, 2048)
        assert resolve_recipe("jumprelu", 256, 2048, None, None, steps=steps)[2] == rule


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


def test_batch_size_halves_until_the_budget_allows_400_topk_or_800_relu_steps() -> None:
    topk = {t: recipe.budget_batch_size("topk", t) for t in (10**5, 400_000, 10**6, 1_638_400, 4 * 10**6)}
    # 1M tokens: 2048 (489 steps), where 4096 would give 245; never below 1024, however short
    assert topk == {10**5: 1024, 400_000: 1024, 10**6: 2048, 1_638_400: 4096, 4 * 10**6: 4096}
    assert recipe.budget_batch_size("topk", None) is None  # an epochs budget before the data is read
    relu = {t: recipe.budget_batch_size("relu", t) for t in (400_000, 10**6, 1_638_400, 4 * 10**6)}
    # 1M tokens: 1024 (977 steps); the built-in default run (4M tokens) keeps 4096 (977 steps)
    assert relu == {400_000: 1024, 10**6: 1024, 1_638_400: 2048, 4 * 10**6: 4096}
    assert recipe.budget_batch_size("batchtopk", 10**6) == 2048  # the TopK family's rule
    assert {recipe.budget_batch_size("jumprelu", t) for t in (10**5, 10**6, None)} == {4096}


def test_a_null_batch_size_trains_at_the_recipe_value_and_a_given_one_wins(make_cfg) -> None:
    cfg = make_cfg("topk", k=3, tokens=40_960, batch_size=None)  # 4096 would be 10 steps: 1024 (40)
    assert resolve_batch_size(cfg) == 1024
    metrics = train(cfg)
    assert (metrics["batch_size"], metrics["steps"]) == (1024, 40)
    expected_lr = resolve_recipe("topk", 32, 128, None, None, steps=40, k=3)[2]
    assert metrics["lr"] == pytest.approx(expected_lr)  # the lr's steps are the resolved batch's
    given = make_cfg("topk", k=3, tokens=40_960, batch_size=2048, out_dir=cfg.out_dir + "-given")
    assert (train(given)["batch_size"], resolve_batch_size(given)) == (2048, 2048)
    relu = make_cfg("relu", tokens=40_960, batch_size=None, out_dir=cfg.out_dir + "-relu")
    assert train(relu)["batch_size"] == 1024  # relu's own rule (800 steps), here 40
    assert resolve_batch_size(make_cfg("jumprelu", tokens=40_960, batch_size=None)) == 4096


def test_an_epochs_budget_resolves_the_batch_size_from_the_train_split(make_cfg) -> None:
    cfg = make_cfg("topk", k=3, tokens=None, epochs=2, batch_size=None)
    assert resolve_batch_size(cfg) is None  # not known before the data is read ...
    assert resolve_batch_size(cfg, n_train_tokens=100_000) == 1024  # 200k tokens: 1024 (195 steps)
    metrics = train(cfg)  # ... and from the train split's size once it is
    assert metrics["batch_size"] == 1024 and metrics["tokens"] >= 2 * 100_000


def test_runs_share_batches_only_when_their_batch_sizes_resolve_alike(make_cfg) -> None:
    null_1m, given_2048 = (
        make_cfg("topk", k=3, tokens=10**6, batch_size=None),
        make_cfg("topk", k=3, tokens=10**6),
    )
    given_2048.batch_size = 2048
    assert stream_key(null_1m) == stream_key(given_2048)  # both train on batches of 2048
    assert stream_key(make_cfg("relu", tokens=10**6, batch_size=None)) != stream_key(null_1m)  # 1024
    epochs = [
        make_cfg(arch, k=k, tokens=None, epochs=2, batch_size=None)
        for arch, k in (("topk", 3), ("batchtopk", 3), ("relu", None))
    ]
    assert stream_key(epochs[0]) == stream_key(epochs[1])  # one family, one budget: one batch size
    assert stream_key(epochs[0]) != stream_key(epochs[2])


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
