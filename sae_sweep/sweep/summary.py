"""End of a sweep: one row per trial (report/trials.csv) and a compact table for the terminal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import TrialState

from sae_sweep import rundir
from sae_sweep.sweep.queue import GRID_ATTR, REASON_ATTR, SLOT_ATTR, STATUS_ATTR

TABLE_METRICS = ("fvu", "l0", "explained_variance", "dead_frac", "mcc")
MAX_TABLE_ROWS = 40
_NOT_METRICS = {"run_dir", STATUS_ATTR, REASON_ATTR, GRID_ATTR, SLOT_ATTR}


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, status, reason, params_<key>, duration, metrics, run_dir, pareto."""
    front = pareto_front(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "status": t.user_attrs.get(STATUS_ATTR, ""),
            "reason": t.user_attrs.get(REASON_ATTR, ""),
            "pareto": t.number in front,
            "retry_of": t.system_attrs.get("failed_trial"),
            "duration_s": duration,
        }
        row.update({f"params_{k}": v for k, v in t.params.items()})
        row.update({k: v for k, v in t.user_attrs.items() if k not in _NOT_METRICS})
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(study: optuna.Study) -> set[int]:
    """Numbers of the completed trials no other completed trial dominates (ties all stay on the front)."""
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions]
    points = {
        t.number: [s * v for s, v in zip(signs, t.values, strict=True)]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    }

    def dominated(a: list[float]) -> bool:
        return any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for b in points.values())

    return {n for n, p in points.items() if not dominated(p)}


def write_csv(frame: pd.DataFrame, report_dir: Path) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "trials.csv"
    # Commands (and machines) sharing a sweep all write its table at their end: each its own temp file.
    rundir.write_text(path, frame.to_csv(index=False))
    return path


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(frame: pd.DataFrame, objectives: list[str]) -> str:
    """Trials (interrupted attempts left out: their retries carry on), Pareto-optimal ones marked *."""
    if frame.empty:
        return "(no trials)"
    shown = frame[frame["status"] != "interrupted"]
    note = ""
    if len(shown) > MAX_TABLE_ROWS:
        shown = shown[shown["pareto"]]
        note = f"\n({len(frame)} trials; the Pareto front is shown, all are in report/trials.csv)"
    params = [c for c in frame.columns if c.startswith("params_")]
    metrics = [m for m in dict.fromkeys([*objectives, *TABLE_METRICS]) if m in frame.columns]
    header = ["trial", *(p.removeprefix("params_") for p in params), "state", *metrics]
    lines = [header]
    for _, row in shown.iterrows():
        state = row["status"] or row["state"].lower()
        mark = "*" if row["pareto"] else " "
        lines.append(
            [
                f"{mark}{row['number']}",
                *(_fmt(row[p]) for p in params),
                state,
                *(_fmt(row[m]) for m in metrics),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    return text + note


def counts(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    interrupted = sum(1 for t in trials if t.user_attrs.get(STATUS_ATTR) == "interrupted")
    parts = [
        f"{by_state[TrialState.COMPLETE]} completed",
        f"{by_state[TrialState.PRUNED]} pruned",
        f"{by_state[TrialState.FAIL] - interrupted} failed",
    ]
    if interrupted:
        parts.append(f"{interrupted} interrupted attempts resumed by retries")
    for state in (TrialState.RUNNING, TrialState.WAITING):
        if by_state[state]:
            parts.append(f"{by_state[state]} {state.name.lower()}")
    return ", ".join(parts)
