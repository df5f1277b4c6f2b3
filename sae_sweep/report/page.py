"""report/index.html: the table, the Pareto trials in words and the figures on one page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sae_sweep import rundir
from sae_sweep.report.collect import collect
from sae_sweep.report.plots import completed, settings_label, swept_params, write_plots
from sae_sweep.report.tables import (
    first_metric_column,
    format_table,
    status_counts,
    summary_table,
    write_tables,
)

CAPTIONS = {
    "frontier.png": "Sparsity (L0, lower = sparser) against reconstruction error (FVU = 1 − explained "
    "variance, lower = better) of every completed trial; the line joins the Pareto front, the trials no "
    "other trial beats on both. Read it from the left: the first front point below your FVU budget is "
    "the sparsest SAE that still explains that much variance.",
    "dead_vs_l1_lambda.png": "Share of dead latents against the sparsity coefficient, one line per "
    "learning rate; an x marks a run that stopped early (collapsed, diverged or pruned) at its last "
    "logged value.",
    "metrics_vs_params.png": "Each held-out metric against each swept parameter (completed trials).",
    "curves.png": "Training curves of every trial against tokens seen.",
    "density_pareto.png": "How often each latent fires on the held-out split, for the Pareto trials: "
    "mass far left = rarely firing (near-dead) latents, right of the dashed line = dense latents.",
}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{padding:3px 9px;border-bottom:1px solid #ddd}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.front{background:#fff7d6}
figure{margin:2em 0}img{max-width:100%}figcaption{color:#555;font-size:14px}code{background:#f3f3f3}"""


def best_line(df: pd.DataFrame, min_ev: float = 0.9) -> str:
    """The frontier's answer in one sentence: the sparsest trial with explained variance >= min_ev."""
    points = completed(df)
    good = points[points["explained_variance"] >= min_ev].sort_values("l0")
    if good.empty:
        return f"No completed trial explains {min_ev:.0%} of the variance."
    row = good.iloc[0]
    return (
        f"Sparsest trial explaining at least {min_ev:.0%} of the variance: #{row['trial']} "
        f"({settings_label(row, swept_params(df))}) with L0 {row['l0']:.3g}, explained variance "
        f"{row['explained_variance']:.4f}, {100 * row['dead_frac']:.1f}% dead latents."
    )


def front_lines(df: pd.DataFrame) -> list[str]:
    front = completed(df)
    front = front[front["pareto"]].sort_values(["sweep", "l0"])
    swept = swept_params(df)
    several = df["sweep"].nunique() > 1
    return [
        f"{row['sweep'] + ' ' if several else ''}#{row['trial']} {settings_label(row, swept)}: "
        f"L0 {row['l0']:.3g}, explained variance {row['explained_variance']:.4f}, "
        f"dead {100 * row['dead_frac']:.1f}%"
        for _, row in front.iterrows()
    ]


def html_table(df: pd.DataFrame) -> str:
    table = summary_table(df)
    shown = format_table(table)
    numeric_from = first_metric_column(shown)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    rows = []
    for front, values in zip(table["pareto"], shown.itertuples(index=False), strict=True):
        cells = "".join(
            f"<td{' class=n' if i >= numeric_from else ''}>{html.escape(str(v))}</td>"
            for i, v in enumerate(values)
        )
        rows.append(f"<tr{' class=front' if front else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_page(df: pd.DataFrame, figures: Sequence[Path], title: str) -> str:
    swept = swept_params(df)
    sweeps = df.attrs.get("sweeps", {})
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>" + "<br>".join(f"<code>{html.escape(p)}</code>" for p in sweeps.values()) + "</p>",
        f"<p>{len(df)} trials ({html.escape(status_counts(df))}); swept: "
        f"{html.escape(', '.join(swept) or 'nothing')}.</p>",
        f"<p><b>{html.escape(best_line(df))}</b></p>",
        "<h2>Pareto front (L0 vs FVU, completed trials)</h2><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in front_lines(df))
        + "</ul>",
        "<h2>Configurations</h2>",
        html_table(df),
        '<p>Also: <a href="table.md">table.md</a> (to paste), <a href="trials.csv">trials.csv</a> '
        "(every trial, every column). Metrics are on the held-out split; the front is highlighted.</p>",
    ]
    for fig in figures:
        parts.append(
            f'<figure><img src="{html.escape(fig.name)}" alt="{html.escape(fig.stem)}">'
            f"<figcaption>{html.escape(CAPTIONS.get(fig.name, ''))}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_all(df: pd.DataFrame, report_dir: Path, title: str, figures: Sequence[str] | None) -> Path:
    written = write_tables(df, report_dir)
    pngs = write_plots(df, report_dir, figures)
    page = report_dir / "index.html"
    rundir.write_text(page, render_page(df, pngs, title))
    for path in [*written, *pngs, page]:
        print(f"wrote {path}")
    return page


def write_report(
    sweep_dir: str | Path,
    study_name: str | None = None,
    progress: bool = True,
    storage: str | Path | None = None,
) -> Path:
    """Collect one sweep and write <sweep_dir>/report/: trials.csv, table.md, the PNGs and index.html.

    Returns the path of index.html. (study_name / storage: see collect.load_trials.)
    """
    sweep_dir = Path(sweep_dir)
    df = collect(sweep_dir, study_name=study_name, progress=progress, storage=storage)
    return _write_all(df, sweep_dir / "report", f"Sweep report: {sweep_dir.name}", None)


def compare_report(
    sweep_dirs: Sequence[str | Path],
    out_dir: str | Path,
    study_name: str | None = None,
    progress: bool = True,
    storage: str | Path | None = None,
) -> Path:
    """Several sweeps in one report in out_dir: their frontiers overlaid, one table with a sweep column."""
    df = collect(list(sweep_dirs), study_name=study_name, progress=progress, storage=storage)
    title = "Sweep comparison: " + " vs ".join(df.attrs["sweeps"])
    return _write_all(df, Path(out_dir), title, ["frontier.png"])
