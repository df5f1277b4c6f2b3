"""One DataFrame from one or more sweep directories: one row per trial (run directory).

The trial directories are the source of truth (config.yaml flattened + metrics.json); the Optuna
study, when the sweep directory holds its storage, adds each trial's state, params and duration, and
rows for trials that never wrote a directory. Nothing here needs the sweep code, so it also reads a
folder of run directories copied by hand, or a sweep that is still running.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from sae_sweep import rundir
from sae_sweep.config import resolve_recipe
from sae_sweep.metrics import COLLAPSED_FVU, RUN_FACTS, every_run_has, running_columns
from sae_sweep.metrics import METRICS as ALL_METRICS
from sae_sweep.progress import progress_bar
from sae_sweep.recipe import budget_batch_size
from sae_sweep.report.pareto import pareto_mask
from sae_sweep.report.study import load_trials, study_columns, trial_run_dir
from sae_sweep.rundir import RESUME_IGNORED_KEYS

# The metrics of a completed run, in the registry's order (LM scores join them where a run has them).
METRICS = every_run_has()
# A stopped run's metrics.json is its last curves.csv row: these were measured on training batches,
# so they get a `last_train_` prefix rather than pass for held-out metrics.
TRAIN_ROW_KEYS = running_columns()
# ... and these are the schedule's values at the stop (warm-up, decay), not the run's settings.
SCHEDULE_KEYS = ("lr", "l1_lambda", "step")
# Config keys that are no hyperparameter even when they differ between trials (nor is sweep.*).
NOT_PARAMS = RESUME_IGNORED_KEYS
# Swept-parameter order in tables and plots: the notes' columns first.
PARAM_ORDER = (
    "architecture",
    "model.k",
    "l1_lambda",
    "lr",
    "batch_size",
    "hidden_dim",
    "tokens_budget",
    "epochs",
    "seed",
)
# Config keys renamed in the frame: `tokens` is the budget in config.yaml but tokens seen in metrics.json.
RENAMED_CONFIG = {"tokens": "tokens_budget", "model.name": "architecture"}
# Sweep overrides that name a config group rather than a key.
GROUP_PARAMS = {"model": "architecture", "data": "data.kind", "optimizer": "optimizer.name"}
STATE_STATUS = {
    "COMPLETE": "completed",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}
COMPLETED = "completed"
# The keys of a metrics.json (the metrics plus the trainer's run facts): what a study's user attrs may fill.
RECORD_KEYS = {*ALL_METRICS, *RUN_FACTS} - {"architecture", "k"}  # config.yaml has those two


# --- Pareto front ----------------------------------------------------------------------------------


# Objectives of a sweep whose study does not say (run directories copied by hand): the default sweep's.
DEFAULT_OBJECTIVES = (("fvu", "minimize"), ("l0", "minimize"))


def add_pareto(df: pd.DataFrame) -> pd.DataFrame:
    """The `pareto` column: on its own sweep's front of that sweep's objectives (df.attrs["objectives"],
    else fvu and l0 minimised), among completed trials whose FVU is below 1."""
    df["pareto"] = False
    done = df["status"].eq(COMPLETED)
    if "fvu" in df:
        done &= ~(pd.Series(pd.to_numeric(df["fvu"], errors="coerce"), index=df.index) >= COLLAPSED_FVU)
    objectives = df.attrs.get("objectives", {})
    for sweep, idx in df[done].groupby("sweep", sort=False).groups.items():
        objs = objectives.get(sweep) or DEFAULT_OBJECTIVES
        part = df.loc[idx]
        cols = [m for m, _ in objs]
        values = np.column_stack(
            [
                np.asarray(pd.to_numeric(part[c], errors="coerce"), dtype=float)
                if c in part
                else np.full(len(part), np.nan)
                for c in cols
            ]
        )
        df.loc[idx, "pareto"] = pareto_mask(values, [d for _, d in objs])
    df["pareto"] = df["pareto"].astype(bool)
    return df


# --- reading one run directory ---------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'kind': 'shards'}} -> {'data.kind': 'shards'}; lists become their string form."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, list | tuple) else value
    return out


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        return {}
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    flat = flatten(tree)  # type: ignore[arg-type]
    return {RENAMED_CONFIG.get(k, k): v for k, v in flat.items()}


def _metric_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json as frame columns; a stopped run's training-batch values renamed (see TRAIN_ROW_KEYS)."""
    out = {k: v for k, v in metrics.items() if k not in ("k", "architecture")}  # config has both
    if out.get("status", COMPLETED) != COMPLETED:
        for key in SCHEDULE_KEYS:
            out.pop(key, None)
        for key in TRAIN_ROW_KEYS:
            if key in out:
                out[f"last_train_{key}"] = out.pop(key)
    return out


def _resolve_defaults(row: dict[str, Any]) -> None:
    """Fill null l1_lambda / lr / hidden_dim / batch_size (the recipe's) so rows group and plot by value.

    A completed run's metrics.json holds the value it used; for others the recipe is recomputed.
    """
    arch = row.get("architecture")
    d_in = row.get("d_in") or (row.get("data.d_in") if row.get("data.kind") == "synthetic" else None)
    if not (arch and d_in):
        return
    hidden, l1_lambda, lr = resolve_recipe(
        arch, int(d_in), row.get("hidden_dim"), row.get("l1_lambda"), row.get("lr")
    )
    row["hidden_dim"], row["lr"] = hidden, lr
    if l1_lambda is not None:
        row["l1_lambda"] = l1_lambda
    if row.get("batch_size") is None:  # the recipe's when the budget decides it from the config alone
        budget = row.get("tokens_budget")
        row["batch_size"] = budget_batch_size(arch, None if budget is None else int(budget))


def read_run_dir(run_dir: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row from a run directory (sae_sweep.rundir): its flattened config, metrics and status.

    A directory without metrics.json is a run in progress ("running" when it has a checkpoint to
    resume from) or one that died before its first checkpoint ("started").
    """
    row: dict[str, Any] = dict(read_config(run_dir) if config is None else config)
    metrics = rundir.read_metrics(run_dir)
    if metrics:
        row.update(_metric_columns(metrics))
    else:
        row["status"] = "running" if (run_dir / rundir.CHECKPOINT).is_file() else "started"
    _resolve_defaults(row)
    start, end = run_dir / rundir.CONFIG, run_dir / rundir.METRICS
    if start.is_file() and end.is_file():  # config.yaml is written at start, metrics.json at the end
        row["duration_s"] = max(0.0, end.stat().st_mtime - start.stat().st_mtime)
    row["run_dir"] = str(run_dir)
    return row


# --- what the Optuna study adds ------------------------------------------------------------------


def param_column(name: str) -> str:
    """The frame column of a sweep parameter (an override key as the user typed it)."""
    return GROUP_PARAMS.get(name, RENAMED_CONFIG.get(name, name))


def _from_study(trial: Any) -> dict[str, Any]:
    """What the study knows of a trial: its params, and the metrics.json keys among its user attrs
    (the rest are the sweep's bookkeeping). Run directories override these where they exist."""
    row = {param_column(k): v for k, v in trial.params.items()}
    attrs = {k: v for k, v in trial.user_attrs.items() if k in RECORD_KEYS}
    row.update(_metric_columns(attrs))
    return row


# --- one sweep, then several -------------------------------------------------------------------------


def trial_numbers(sweep_dir: Path) -> dict[int, Path]:
    trials = sweep_dir / "trials"
    if not trials.is_dir():
        return {}
    return {int(p.name): p for p in trials.iterdir() if p.is_dir() and p.name.isdigit()}


def ordered_params(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [p for p in PARAM_ORDER if p in names]
    return known + sorted(n for n in names if n not in PARAM_ORDER)


def _differing_config(df: pd.DataFrame, config_cols: set[str]) -> list[str]:
    cols = [c for c in config_cols if c in df and c not in NOT_PARAMS and not c.startswith("sweep.")]
    return [c for c in cols if df[c].astype(str).where(df[c].notna()).nunique() > 1]


def _status(trial: Any, run_dir: Path | None, row: dict[str, Any]) -> str:
    """metrics.json's verdict, else the status the sweep recorded (e.g. interrupted), else the state."""
    if run_dir is not None and (run_dir / rundir.METRICS).is_file():
        return row["status"]
    recorded = trial.user_attrs.get("status")
    if isinstance(recorded, str):
        return recorded
    state = str(trial.state.name)
    return STATE_STATUS.get(state, state.lower())


def collect_sweep(
    sweep_dir: Path,
    name: str,
    study_name: str | None = None,
    storage: str | Path | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[str]]:
    """(rows of one sweep, its swept parameters)."""
    dirs = trial_numbers(sweep_dir)
    configs = {n: read_config(d) for n, d in dirs.items()}
    first = next((c for c in configs.values() if c), {})
    study, trials, objectives = load_trials(sweep_dir, study_name, storage, first)
    by_number = {t.number: t for t in trials}
    # an attempt that a later trial continued (interrupted, or failed and retried): its successor
    retried_by = {
        t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")
    }
    rows = []
    numbers = sorted(set(dirs) | set(by_number))
    for number in progress_bar(iterable=numbers, desc=f"collect {name}", unit="trial", enabled=progress):
        trial = by_number.get(number)
        run_dir = dirs.get(number) or trial_run_dir(sweep_dir, number, trial)
        row: dict[str, Any] = {"sweep": name, "trial": number}
        if trial is not None:
            row.update(_from_study(trial))
        if run_dir is not None:
            row.update(read_run_dir(run_dir, configs.get(number)))
        if trial is not None:
            row.update(study_columns(trial))  # Optuna's clock beats file times
            row["study"] = study
            row["status"] = _status(trial, run_dir, row)
            row["retried_by"] = retried_by.get(number)
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["sweep", "trial", "status"])
    if study is not None and trials:
        swept = [param_column(p) for t in trials for p in t.params]
    else:
        swept = _differing_config(df, {k for c in configs.values() for k in c})
    df.attrs["objectives"] = objectives or list(DEFAULT_OBJECTIVES)
    return df, ordered_params(swept)


def sweep_names(dirs: Sequence[Path]) -> list[str]:
    """Short names that tell the sweeps apart: the directory name, with its parent if names clash."""
    names = [d.resolve().name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dirs]


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Columns whose values are all numbers (None aside) become float, so NaN marks missing."""
    for col in df.columns:
        if df[col].dtype == object:
            values = df[col].dropna()
            if len(values) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                df[col] = df[col].astype(float)
    return df


def column_order(df: pd.DataFrame, swept: list[str]) -> list[str]:
    head = ["sweep", "trial", "status", "state", "pareto", *swept, *METRICS]
    run = [
        "tokens",
        "steps",
        "duration_s",
        "train_seconds",
        "dead_window_tokens",
        "n_eval_tokens",
        "resumed_from_tokens",
        "architecture",
        "d_in",
        "hidden_dim",
        "l1_lambda",
        "lr",
        "batch_size",
        "model.k",
        "scale_factor",
        "raw_mean_norm",
    ]
    head += run + sorted(c for c in df if c.startswith("last_train_"))
    tail = ["reason", "retried_by", "study", "datetime_start", "run_dir"]
    seen = list(dict.fromkeys(c for c in head if c in df and c not in tail))
    config = sorted(c for c in df if c not in seen and c not in tail)
    return seen + config + [c for c in tail if c in df]


def collect(
    sweep_dirs: str | Path | Sequence[str | Path],
    study_name: str | None = None,
    progress: bool = True,
    storage: str | Path | None = None,
) -> pd.DataFrame:
    """One row per trial of every sweep directory given, with a `pareto` column (see module docstring).

    `df.attrs["swept"]` lists the swept parameters (the study's params, else the config keys whose
    values differ between trials); `df.attrs["sweeps"]` maps each sweep's name to its directory.
    Metrics a trial lacks (pruned, diverged, collapsed, still running) are NaN. `study_name` and
    `storage` are needed only where they cannot be found (see report.study.load_trials).
    """
    if isinstance(sweep_dirs, str | Path):
        sweep_dirs = [sweep_dirs]
    dirs = [Path(d) for d in sweep_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such sweep directory")
    frames, swept, objectives = [], [], {}
    for d, name in zip(dirs, sweep_names(dirs), strict=True):
        frame, params = collect_sweep(d, name, study_name, storage, progress)
        objectives[name] = frame.attrs["objectives"]
        frames.append(frame)
        swept += params
    df = (
        pd.concat([f for f in frames if len(f)], ignore_index=True)
        if any(len(f) for f in frames)
        else frames[0]
    )
    df = _numeric(df)
    for col in METRICS:
        if col not in df:
            df[col] = np.nan
    df.attrs["objectives"] = objectives
    df = add_pareto(df)
    swept = ordered_params(swept)
    df = df.loc[:, column_order(df, swept)].reset_index(drop=True)
    df.attrs["objectives"] = objectives
    df.attrs["swept"] = swept
    df.attrs["sweeps"] = {name: str(d) for d, name in zip(dirs, sweep_names(dirs), strict=True)}
    return df


# --- per-trial files for plots and notebooks ---------------------------------------------------------


def load_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Every trial's curves.csv stacked, with `sweep` and `trial` columns (empty frame if none)."""
    parts = []
    for run_dir, trial, sweep in zip(df["run_dir"], df["trial"], df["sweep"], strict=True):
        path = Path(run_dir) / rundir.CURVES if isinstance(run_dir, str) else None
        if path is not None and path.is_file():
            curves = pd.read_csv(path)
            curves.insert(0, "trial", trial)
            curves.insert(0, "sweep", sweep)
            parts.append(curves)
    return (
        pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["sweep", "trial", "tokens"])
    )


def load_density(run_dir: str | Path) -> dict[str, Any]:
    """density.json of a completed run: per-latent `density` and the log10 `histogram`; {} if absent."""
    return rundir.read_json(Path(run_dir) / rundir.DENSITY) or {}


def latest_sweep(root: str | Path = "outputs") -> Path:
    """The most recently changed sweep directory (one holding trials/) under root."""
    candidates = [p.parent for p in Path(root).glob("*/trials") if p.is_dir()]
    if not candidates:
        raise FileNotFoundError(f"no sweep directory (a folder holding trials/) under {root}")
    return max(
        candidates, key=lambda p: max((c.stat().st_mtime for c in (p / "trials").iterdir()), default=0)
    )
