"""The researcher's table: one row per configuration, the notes' columns, markdown to paste."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from sae_sweep import rundir
from sae_sweep.metrics import METRICS, TABLE
from sae_sweep.report.collect import COMPLETED, PARAM_ORDER

# The configuration columns every table shows (the notes' own), before any other swept parameter.
NOTES_PARAMS = ("l1_lambda", "lr", "batch_size", "hidden_dim")
Formatter = Callable[[float], str]


def _format(spec: str) -> Formatter:
    return lambda v: format(v, spec)


# (column in the summary, header, formatter) of the headline metrics (metrics.TABLE); a fraction shown
# as a percentage is the column <name without _frac>_pct.
HEADLINE: tuple[tuple[str, str, Formatter], ...] = tuple(
    (name.removesuffix("_frac") + "_pct" if m.percent else name, m.header, _format(m.fmt))
    for name, m in ((n, METRICS[n]) for n in TABLE)
)
PARETO_MARK = "★"
MISSING = "–"
INTERRUPTED = "interrupted"  # the sweep's status for a trial whose worker died; a new trial continues it


def config_columns(df: pd.DataFrame) -> list[str]:
    """What makes a configuration: the sweep (when several), the notes' keys, every swept parameter.

    A swept seed is left out so that repeated seeds of one configuration share a row.
    """
    swept = [p for p in df.attrs.get("swept", []) if p != "seed"]
    cols = ["sweep"] if df["sweep"].nunique() > 1 else []
    for name in (*PARAM_ORDER, *swept):
        if name in cols or name == "seed" or name not in df or df[name].isna().all():
            continue
        if name in NOTES_PARAMS or name in swept or (name == "architecture" and df[name].nunique() > 1):
            cols.append(name)
        elif name == "model.k":  # a column only where an architecture has k
            cols.append(name)
    return cols or ["trial"]  # run directories without a config: one row per trial


def _status(statuses: pd.Series) -> str:
    counts = statuses.fillna("unknown").value_counts()
    if len(statuses) == 1:
        return str(statuses.iloc[0])
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (numbers, not strings): status, run count, mean headline metrics of
    its completed runs, and whether any of its runs is on the Pareto front. Sorted by configuration."""
    keys = config_columns(df)
    continued = df["status"].eq(INTERRUPTED)  # its run goes on in the retry trial: not a run of its own
    if "retried_by" in df:
        continued |= df["retried_by"].notna()  # a failed attempt retried by a later trial, likewise
    df = df.loc[~continued]
    percents = {
        column: 100 * df[name]
        for name, (column, _, _) in zip(TABLE, HEADLINE, strict=True)
        if METRICS[name].percent
    }
    data = df.assign(**percents)
    # shown only where the data has them (e.g. mcc: ground truth)
    optional = {column for name, (column, _, _) in zip(TABLE, HEADLINE, strict=True) if METRICS[name].needs}
    metrics = [
        name for name, _, _ in HEADLINE if name in data and (name not in optional or data[name].notna().any())
    ]
    done = data["status"].eq(COMPLETED)
    data[metrics] = data[metrics].where(done, np.nan)  # a stopped run's numbers are not held-out ones
    grouped = data.groupby(keys, dropna=False, sort=False)
    table = grouped.agg({name: "mean" for name in metrics})
    table.insert(0, "status", grouped["status"].agg(_status))
    table.insert(1, "runs", grouped.size())
    table["pareto"] = grouped["pareto"].any()
    table = table.reset_index()
    order = {name: i for i, name in enumerate(dict.fromkeys(df["sweep"]))}  # sweeps as given, not a-z
    table = table.sort_values(
        keys, key=lambda c: c.map(order) if c.name == "sweep" else c, na_position="last", kind="stable"
    )
    table = table.reset_index(drop=True)
    table.attrs["keys"] = keys
    return table


def _format_param(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:g}" if not value.is_integer() or abs(value) >= 1e6 else f"{value:.0f}"
    return str(value)


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The summary as display strings with the notes' headers (status and runs only when they say
    something); shared by table.md and the HTML page."""
    keys = table.attrs.get("keys", [])
    out = pd.DataFrame({k: table[k].map(_format_param) for k in keys})
    if (table["runs"] > 1).any():
        out["runs"] = table["runs"].astype(str)
    if table["status"].ne(COMPLETED).any():
        out["status"] = table["status"]
    for name, header, fmt in HEADLINE:
        if name in table:
            out[header] = table[name].map(lambda v, f=fmt: MISSING if pd.isna(v) else f(v))
    out["Pareto"] = table["pareto"].map({True: PARETO_MARK, False: ""})
    return out


def first_metric_column(shown: pd.DataFrame) -> int:
    """Where the numbers start in a format_table() frame (right-aligned from there on)."""
    headers = {header for _, header, _ in HEADLINE}
    return next((i for i, c in enumerate(shown.columns) if c in headers), len(shown.columns))


def to_markdown(frame: pd.DataFrame, numeric_from: int) -> str:
    """A GitHub pipe table; columns from `numeric_from` on are right-aligned (numbers)."""
    cells = [list(frame.columns), *frame.astype(str).values.tolist()]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(frame.columns))]

    def line(row: list[str]) -> str:
        padded = [
            str(c).rjust(w) if i >= numeric_from else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if i >= numeric_from else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |", *(line(r) for r in cells[1:])])


def status_counts(df: pd.DataFrame) -> str:
    return ", ".join(f"{n} {s}" for s, n in df["status"].fillna("unknown").value_counts().items())


def _objectives_text(df: pd.DataFrame) -> str:
    """The objectives the Pareto column is of, e.g. "fvu (min), l0 (min)" (per sweep when they differ)."""
    per_sweep = df.attrs.get("objectives") or {}
    texts = {", ".join(f"{m} ({d[:3]})" for m, d in objs) for objs in per_sweep.values() if objs} or {
        "fvu (min), l0 (min)"
    }
    return "; ".join(sorted(texts))


def markdown_report(df: pd.DataFrame) -> str:
    table = summary_table(df)
    shown = format_table(table)
    sweeps = ", ".join(df.attrs.get("sweeps", {}) or df["sweep"].unique())
    window = df["dead_window_tokens"].dropna() if "dead_window_tokens" in df else pd.Series(dtype=float)
    dead_def = f"{window.max():,.0f}" if len(window) else "`train.dead_window`"
    stopped = table["status"].ne(COMPLETED).any()
    lines = [
        f"## {sweeps}: {len(df)} trials ({status_counts(df)})",
        "",
        to_markdown(shown, first_metric_column(shown)),
        "",
        f"Held-out metrics of completed runs (mean over runs when a configuration ran more than once). "
        f"dead % = latents that did not fire in the last {dead_def} training tokens; alive % = 100 - dead %. "
        f"{PARETO_MARK} = on the Pareto front of {_objectives_text(df)} (no completed run is at least as "
        "good on each and better on one)."
        + (
            f" {MISSING} = no held-out metrics: the run stopped early or never ran (see status)."
            if stopped
            else ""
        ),
        "",
    ]
    return "\n".join(lines)


def write_tables(df: pd.DataFrame, report_dir: Path) -> list[Path]:
    """report/trials.csv (every trial, every column) and report/table.md (the researcher's table)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = report_dir / "trials.csv", report_dir / "table.md"
    rundir.write_text(csv_path, df.to_csv(index=False))
    rundir.write_text(md_path, markdown_report(df))
    return [csv_path, md_path]
