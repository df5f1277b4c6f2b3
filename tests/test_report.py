"""The report: collector (rows, columns, Pareto), tables, plots, page and CLI, on a small real sweep."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import matplotlib.image
import optuna
import pandas as pd
import pytest
from conftest import SMALL_DATA
from omegaconf import OmegaConf
from test_report_pareto import brute_force_pareto

from sae_sweep.config import Config, DataConfig, OptimizerConfig, TrainConfig
from sae_sweep.errors import RunStopped
from sae_sweep.models import model_config
from sae_sweep.report import collect, write_report
from sae_sweep.report.__main__ import main
from sae_sweep.report.collect import METRICS
from sae_sweep.report.plots import FIGURES
from sae_sweep.report.tables import summary_table, write_tables
from sae_sweep.train import train

L1_LAMBDAS = (0.0, 1.0, 3.0, 10.0)
LRS = (1e-3, 4e-3)
PRUNED = {"l1_lambda": 1.0, "lr": 2e-3}  # stopped by a pruner after a few log rows
COLLAPSED = {"l1_lambda": 1e4, "lr": 4e-3}  # every latent dies: the notes' failure
N_TRIALS = len(L1_LAMBDAS) * len(LRS) + 4  # + pruned, collapsed, failed and interrupted (no directory)


def _trial_cfg(out_dir: Path, data_root: Path, l1_lambda: float, lr: float):
    cfg = Config(
        model=model_config("relu"),
        data=DataConfig(**{**SMALL_DATA, "path": str(data_root)}),
        optimizer=OptimizerConfig(),
        train=TrainConfig(progress=False, log_every_tokens=8192, dead_window=30_000),
        l1_lambda=l1_lambda,
        lr=lr,
        batch_size=512,
        hidden_dim=128,
        tokens=150_000,
        seed=0,
        device="cpu",
        out_dir=str(out_dir),
    )
    return OmegaConf.structured(cfg)


def _stop_after(rows: int):
    seen = []

    def on_log(row: dict) -> None:
        seen.append(row)
        if len(seen) >= rows:
            raise RunStopped("pruned", f"pruned at {row['tokens']} tokens (test)")

    return on_log


def build_sweep(sweep: Path, data_root: Path) -> Path:
    """A sweep directory as the sweep layer leaves it: trials/<n>/ run directories and study.db.

    Built once per session (several test modules share it through the marker file).
    """
    done = sweep / ".built"
    if done.exists():
        return sweep
    if sweep.exists():
        shutil.rmtree(sweep)
    (sweep / "trials").mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="small", storage=f"sqlite:///{sweep / 'study.db'}", directions=["minimize", "minimize"]
    )
    space: dict[str, optuna.distributions.BaseDistribution] = {
        "l1_lambda": optuna.distributions.CategoricalDistribution([*L1_LAMBDAS, COLLAPSED["l1_lambda"]]),
        "lr": optuna.distributions.CategoricalDistribution([*LRS, PRUNED["lr"]]),
    }
    grid = [dict(l1_lambda=a, lr=b) for a, b in itertools.product(L1_LAMBDAS, LRS)]
    for params in [*grid, PRUNED, COLLAPSED]:
        study.enqueue_trial(params)
        trial = study.ask(space)
        run_dir = sweep / "trials" / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        cfg = _trial_cfg(run_dir, data_root, **params)
        try:
            metrics = train(cfg, on_log=_stop_after(3) if params is PRUNED else None)
        except RunStopped as stop:
            state = (
                optuna.trial.TrialState.PRUNED if stop.status == "pruned" else optuna.trial.TrialState.FAIL
            )
            study.tell(trial, state=state)
            continue
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [metrics["l0"], metrics["fvu"]])
    study.enqueue_trial({"l1_lambda": 3.0, "lr": 2e-3})
    study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL)  # crashed before writing anything
    # A worker that died: the sweep marks its trial interrupted and a retry trial continues the run
    # (here trial 0's); queue bookkeeping in user attrs must not become columns.
    study.enqueue_trial(grid[0], user_attrs={"grid_point": 0, "status": "interrupted"})
    study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL)
    done.touch()
    return sweep


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, data_root) -> Path:
    return build_sweep(tmp_path_factory.getbasetemp() / "report-sweep" / "small", data_root)


@pytest.fixture(scope="session")
def frame(small_sweep) -> pd.DataFrame:
    return collect(small_sweep, progress=False)


def test_pareto_column_is_the_front_of_completed_trials(frame):
    done = frame["status"] == "completed"
    expected = brute_force_pareto(frame.loc[done, "l0"].tolist(), frame.loc[done, "fvu"].tolist())
    assert frame.loc[done, "pareto"].tolist() == expected
    assert not frame.loc[~done, "pareto"].any()
    assert 2 <= frame["pareto"].sum() < done.sum()


def test_collect_has_a_row_per_trial_with_params_state_and_metrics(frame):
    assert len(frame) == N_TRIALS and frame["trial"].tolist() == list(range(N_TRIALS))
    assert frame.attrs["swept"] == ["l1_lambda", "lr"]
    for col in [
        "sweep",
        "trial",
        "status",
        "state",
        "pareto",
        "l1_lambda",
        "lr",
        "duration_s",
        "tokens",
        "run_dir",
        "pct_active_batch",
        *METRICS,
    ]:
        assert col in frame, col
    assert frame["status"].value_counts().to_dict() == {
        "completed": 8,
        "pruned": 1,
        "collapsed": 1,
        "failed": 1,
        "interrupted": 1,
    }
    assert "grid_point" not in frame  # the sweep's bookkeeping attrs stay out
    done = frame[frame["status"] == "completed"]
    assert (done["state"] == "COMPLETE").all() and done["fvu"].notna().all()
    assert done["explained_variance"].to_numpy() == pytest.approx(1 - done["fvu"].to_numpy())
    assert (done["tokens"] >= 150_000).all() and (done["duration_s"] > 0).all()
    assert sorted(zip(done["l1_lambda"], done["lr"], strict=True)) == sorted(
        itertools.product(L1_LAMBDAS, LRS)
    )

    pruned = frame[frame["status"] == "pruned"].iloc[0]
    assert pruned["state"] == "PRUNED" and pruned["lr"] == PRUNED["lr"]
    assert all(pd.isna(pruned[m]) for m in ("fvu", "l0", "mse", "dead_frac"))  # never passes for held-out
    assert 0 < pruned["tokens"] < 150_000 and pruned["last_train_l0"] > 0

    failed = frame[frame["status"] == "failed"].iloc[0]  # only the study knows it
    assert failed["state"] == "FAIL" and failed["l1_lambda"] == 3.0 and pd.isna(failed["run_dir"])


def test_collect_without_a_study_finds_the_swept_keys_from_the_configs(small_sweep, tmp_path):
    shutil.copytree(small_sweep / "trials", tmp_path / "runs" / "trials")
    (tmp_path / "runs" / "trials" / "3" / "metrics.json").unlink()  # a run still going
    df = collect(tmp_path / "runs", progress=False)
    assert df.attrs["swept"] == ["l1_lambda", "lr"]
    assert len(df) == N_TRIALS - 2 and "state" not in df  # the failed and interrupted trials had no directory
    assert df.set_index("trial").loc[3, "status"] == "started"
    assert df["pareto"].sum() >= 2


def test_table_has_a_row_per_configuration_in_reading_order(frame):
    table = summary_table(frame)
    assert table.attrs["keys"] == ["l1_lambda", "lr", "batch_size", "hidden_dim"]
    assert len(table) == N_TRIALS - 1  # every trial is its own configuration, but the interrupted one
    keys = list(zip(table["l1_lambda"], table["lr"], strict=True))
    assert keys == sorted(keys)
    assert table.loc[table["status"] == "completed", "alive_pct"].between(0, 100).all()
    done = frame[frame["status"] == "completed"].set_index(["l1_lambda", "lr"])
    row = table[(table["l1_lambda"] == 10.0) & (table["lr"] == 4e-3)].iloc[0]
    assert row["dead_pct"] == pytest.approx(100 * done.loc[(10.0, 4e-3), "dead_frac"])
    assert row["alive_pct"] + row["dead_pct"] == pytest.approx(100)


def test_table_md_reads_like_the_notes(frame, tmp_path):
    csv_path, md_path = write_tables(frame, tmp_path)
    assert len(pd.read_csv(csv_path)) == N_TRIALS
    lines = md_path.read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == [
        "l1_lambda",
        "lr",
        "batch_size",
        "hidden_dim",
        "status",
        "alive %",
        "dead %",
        "L0",
        "MSE",
        "L1",
        "expl. var.",
        "MCC",
        "Pareto",
    ]
    rows = [line for line in lines[4:] if line.startswith("|")]
    assert len(rows) == N_TRIALS - 1
    assert sum("★" in r for r in rows) == frame["pareto"].sum()
    pruned = next(r for r in rows if "pruned" in r)
    assert "–" in pruned and "★" not in pruned
    assert rows[0].split("|")[1].strip() == "0"  # l1_lambda=0 (the dense baseline) first


def _image_ok(path: Path) -> tuple[int, int]:
    img = matplotlib.image.imread(path)
    height, width = img.shape[:2]
    assert 500 <= width <= 3000 and 350 <= height <= 2500, (path.name, width, height)
    assert img[..., :3].std() > 0.05, f"{path.name} looks blank"
    return width, height


def test_write_report_writes_table_plots_and_page(small_sweep):
    page = write_report(small_sweep, progress=False)
    report = small_sweep / "report"
    assert page == report / "index.html"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == sorted(FIGURES)
    for name in pngs:
        _image_ok(report / name)
        assert f'src="{name}"' in page.read_text()
    text = page.read_text()
    assert "Pareto front" in text and "table.md" in text and "<table>" in text


def test_cli_overlays_two_sweeps(small_sweep, tmp_path, capsys):
    other = tmp_path / "topk-like"
    shutil.copytree(small_sweep, other, ignore=shutil.ignore_patterns("report"))
    for metrics_path in (other / "trials").glob("*/metrics.json"):
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("status") == "completed":  # a better frontier, so the two curves differ
            metrics["fvu"] *= 0.5
            metrics_path.write_text(json.dumps(metrics))
    out = tmp_path / "compare"
    assert main([str(small_sweep), str(other), "--out", str(out), "--quiet"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    _image_ok(out / "frontier.png")
    table = (out / "table.md").read_text()
    assert "| sweep" in table and "small" in table and "topk-like" in table
    assert (other / "report" / "frontier.png").is_file()
    assert main([str(tmp_path / "nope")]) == 2


def test_a_sweep_with_nothing_finished_still_reports(small_sweep, tmp_path):
    sweep = tmp_path / "early"
    for n, status in enumerate(("started", "running", "pruned")):
        run = sweep / "trials" / str(n)
        run.mkdir(parents=True)
        shutil.copy(small_sweep / "trials" / "0" / "config.yaml", run / "config.yaml")
        if status == "running":
            (run / "checkpoint.pt").write_bytes(b"")
        if status == "pruned":
            shutil.copy(small_sweep / "trials" / "8" / "metrics.json", run / "metrics.json")
            shutil.copy(small_sweep / "trials" / "8" / "curves.csv", run / "curves.csv")
    page = write_report(sweep, progress=False)
    df = collect(sweep, progress=False)
    assert df["status"].tolist() == ["started", "running", "pruned"] and not df["pareto"].any()
    assert "No completed trial" in page.read_text()
    _image_ok(sweep / "report" / "frontier.png")
