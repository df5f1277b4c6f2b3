"""End of a sweep: the terminal table, from the report's one trials frame (report/collect.py), whose
report/trials.csv and table.md are written whatever `sweep.report` says (it adds plots and index.html)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from sae_sweep.metrics import TERMINAL
from sae_sweep.models.registry import architectures
from sae_sweep.report.collect import collect
from sae_sweep.report.tables import write_tables

MAX_TABLE_ROWS = 40
INTERRUPTED = "interrupted"


def sweep_frame(sweep_dir: Path, study_name: str, storage: str) -> pd.DataFrame:
    """One row per trial of the sweep (collect's frame: the study plus the trial directories)."""
    return collect(sweep_dir, study_name=study_name, storage=storage, progress=False)


def write_csv(frame: pd.DataFrame, report_dir: Path) -> Path:
    """report/trials.csv and report/table.md of the frame; returns the path of trials.csv."""
    return write_tables(frame, report_dir)[0]


def latest_attempts(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows without the attempts a later trial continued (interrupted, or failed and retried)."""
    if frame.empty:
        return frame
    gone = frame["status"].eq(INTERRUPTED)
    if "retried_by" in frame:
        gone |= frame["retried_by"].notna()
    return pd.DataFrame(frame[~gone])


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _has_penalty_arch(frame: pd.DataFrame) -> bool:
    penalised = [name for name, cls in architectures().items() if cls.family == "penalty"]
    return "architecture" in frame.columns and bool(frame["architecture"].isin(penalised).any())


def format_table(frame: pd.DataFrame, objectives: list[str]) -> str:
    """Trials (attempts continued by a retry left out: their retries carry on), Pareto-optimal ones *."""
    if frame.empty:
        return "(no trials)"
    shown = latest_attempts(frame)
    note = ""
    if len(shown) > MAX_TABLE_ROWS:
        shown = shown[shown["pareto"]]
        note = f"\n({len(frame)} trials; the Pareto front is shown, all are in report/trials.csv)"
    params = [p for p in frame.attrs.get("swept", []) if p in frame.columns]
    metrics = [m for m in dict.fromkeys([*objectives, *TERMINAL]) if m in frame.columns]
    metrics = [m for m in metrics if frame[m].notna().any() or m in objectives]
    if "dead_frac" in metrics and _has_penalty_arch(frame) and "pct_active_batch" in frame.columns:
        # the notes' per-batch "% active" beside the real dead fraction: they differ, and the notes tracked it
        metrics.insert(metrics.index("dead_frac") + 1, "pct_active_batch")
    header = ["trial", *params, "state", *metrics]
    lines = [header]
    for row in pd.DataFrame(shown).to_dict(orient="records"):
        state = row.get("status") or str(row.get("state", "")).lower()
        mark = "*" if row.get("pareto") else " "
        done = state == "completed"  # a stopped run's numbers are training-batch ones: not shown
        lines.append(
            [
                f"{mark}{row['trial']}",
                *(_fmt(row.get(p)) for p in params),
                str(state),
                *(_fmt(row.get(m) if done else None) for m in metrics),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    return text + note


def counts(frame: pd.DataFrame) -> str:
    """How many trials are in each state, e.g. "6 completed, 0 pruned, 1 failed, 2 waiting"."""
    states = frame["state"] if "state" in frame else pd.Series(dtype=object)
    status = frame["status"] if "status" in frame else pd.Series(dtype=object)
    continued = status.eq(INTERRUPTED)
    if "retried_by" in frame:
        continued |= frame["retried_by"].notna() & states.eq("FAIL")
    parts = [
        f"{int(states.eq('COMPLETE').sum())} completed",
        f"{int(states.eq('PRUNED').sum())} pruned",
        f"{int((states.eq('FAIL') & ~continued).sum())} failed",
    ]
    if continued.any():
        parts.append(f"{int(continued.sum())} interrupted or failed attempts resumed by retries")
    for state in ("RUNNING", "WAITING"):
        if states.eq(state).any():
            parts.append(f"{int(states.eq(state).sum())} {state.lower()}")
    return ", ".join(parts)
