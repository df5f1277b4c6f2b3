"""report/index.html: the table, the Pareto trials in words and the figures on one page.

With `features` on (the default), each Pareto trial also gets its feature browser
(`<run dir>/features/index.html`, see sae_sweep.features) and the page links each Pareto point to
it, from the list and from an SVG copy of the frontier whose points are links (a PNG cannot hold any).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd

from sae_sweep import rundir
from sae_sweep.report.collect import collect
from sae_sweep.report.encodings import completed, settings_label, swept_params
from sae_sweep.report.plots import write_plots
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
    good = points.loc[points["explained_variance"] >= min_ev].sort_values("l0")
    if good.empty:
        return f"No completed trial explains {min_ev:.0%} of the variance."
    row = good.iloc[0]
    return (
        f"Sparsest trial explaining at least {min_ev:.0%} of the variance: #{row['trial']} "
        f"({settings_label(row, swept_params(df))}) with L0 {row['l0']:.3g}, explained variance "
        f"{row['explained_variance']:.4f}, {100 * row['dead_frac']:.1f}% dead latents."
    )


def _front(df: pd.DataFrame) -> pd.DataFrame:
    front = completed(df)
    return cast(pd.DataFrame, front[front["pareto"]]).sort_values(by=["sweep", "l0"])


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in df.to_dict("records")]


def _lm_part(row: Any) -> str:
    score = row.get("ce_loss_score")
    if score is None or not isinstance(score, float) or math.isnan(score):
        return ""
    return f", CE-loss score {score:.3f} (ΔLM loss {row['delta_lm_loss']:.3f})"


def front_lines(df: pd.DataFrame) -> list[str]:
    front = _front(df)
    swept = swept_params(df)
    several = bool(df["sweep"].nunique() > 1)
    return [
        f"{row['sweep'] + ' ' if several else ''}#{row['trial']} {settings_label(row, swept)}: "
        f"L0 {row['l0']:.3g}, explained variance {row['explained_variance']:.4f}, "
        f"dead {100 * row['dead_frac']:.1f}%{_lm_part(row)}"
        for _, row in front.iterrows()
    ]


def build_browsers(df: pd.DataFrame, report_dir: Path, features: Any) -> dict[tuple[str, int], str]:
    """Feature browsers of the Pareto trials -> {(sweep, trial): link relative to report_dir}.

    A trial whose browser cannot be built is left without a link (and the reason is printed): the
    report must not depend on it.
    """
    from sae_sweep.errors import SaeSweepError
    from sae_sweep.features import FeaturesConfig, build_features

    cfg = features if isinstance(features, FeaturesConfig) else FeaturesConfig(progress=False)
    links = {}
    for row in _records(_front(df)):
        run_dir = row.get("run_dir")
        if not isinstance(run_dir, str) or not (Path(run_dir) / "sae.safetensors").is_file():
            continue
        index = Path(run_dir) / "features" / "index.html"
        fresh = (
            index.is_file() and index.stat().st_mtime >= (Path(run_dir) / "sae.safetensors").stat().st_mtime
        )
        if not fresh:  # a report run again (or a comparison) reuses the browsers already built
            try:
                index = build_features(run_dir, cfg)
            except (SaeSweepError, OSError) as err:
                print(f"no feature browser for trial {row['trial']}: {err}")
                continue
            print(f"wrote {index}")
        links[(row["sweep"], int(row["trial"]))] = os.path.relpath(index, report_dir)
    return links


def frontier_svg(
    df: pd.DataFrame, links: dict[tuple[str, int], str], width: int = 640, height: int = 360
) -> str:
    """L0 (log x) against FVU (log y) of the completed trials, the front joined, its points linked."""
    points = completed(df)
    if points.empty:
        return ""
    lx = [math.log10(v) for v in points["l0"]]
    ly = [math.log10(v) for v in points["fvu"]]
    pad = 40

    def xy(l0: float, fvu: float) -> tuple[float, float]:
        fx = (math.log10(l0) - min(lx)) / ((max(lx) - min(lx)) or 1)
        fy = (math.log10(fvu) - min(ly)) / ((max(ly) - min(ly)) or 1)
        return pad + fx * (width - 2 * pad), height - pad - fy * (height - 2 * pad)

    front = _front(df)
    line = " ".join("{:.1f},{:.1f}".format(*xy(r["l0"], r["fvu"])) for r in _records(front))
    parts = [f'<polyline points="{line}" fill="none" stroke="black" stroke-width="1.2"/>']
    for r in _records(points):
        x, y = xy(r["l0"], r["fvu"])
        tip = f"#{r['trial']}: L0 {r['l0']:.3g}, FVU {r['fvu']:.4f}"
        link = links.get((r["sweep"], int(r["trial"])))
        dot = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{6 if r["pareto"] else 4}" ' + (
            'fill="#d62728"' if r["pareto"] else 'fill="#9bb7d4"'
        )
        if link:
            dot += f"><title>{html.escape(tip)}: open its features</title></circle>"
            parts.append(f'<a href="{html.escape(link)}">{dot}</a>')
            parts.append(
                f'<a href="{html.escape(link)}"><text x="{x + 8:.1f}" y="{y - 6:.1f}" font-size="11">'
                f"#{r['trial']}</text></a>"
            )
        else:
            parts.append(dot + f"><title>{html.escape(tip)}</title></circle>")
    axes = (
        f'<text x="{width / 2:.0f}" y="{height - 8}" font-size="12">L0 (log scale) →</text>'
        f'<text x="4" y="16" font-size="12">FVU (log scale) ↑</text>'
        f'<text x="{pad}" y="{height - pad + 16}" font-size="10">{points["l0"].min():.3g}</text>'
        f'<text x="{width - pad - 20}" y="{height - pad + 16}" font-size="10">{points["l0"].max():.3g}</text>'
        f'<text x="4" y="{height - pad}" font-size="10">{points["fvu"].min():.3g}</text>'
        f'<text x="4" y="{pad}" font-size="10">{points["fvu"].max():.3g}</text>'
    )
    return (
        f'<svg id="frontier-links" width="{width}" height="{height}" role="img" '
        f'style="border:1px solid #ddd">{axes}{"".join(parts)}</svg>'
    )


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


def render_page(
    df: pd.DataFrame, figures: Sequence[Path], title: str, links: dict[tuple[str, int], str] | None = None
) -> str:
    links = links or {}
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
        + "".join(
            f"<li>{html.escape(line)}{_link(links, key)}</li>"
            for line, key in zip(front_lines(df), _front_keys(df), strict=True)
        )
        + "</ul>",
        "<h2>Configurations</h2>",
        html_table(df),
        '<p>Also: <a href="table.md">table.md</a> (to paste), <a href="trials.csv">trials.csv</a> '
        "(every trial, every column). Metrics are on the held-out split; the front is highlighted.</p>",
    ]
    if links:
        parts.append(
            "<figure>" + frontier_svg(df, links) + "<figcaption>The frontier again, drawn as links: "
            "click a red (Pareto) point to open that trial's feature browser.</figcaption></figure>"
        )
    for fig in figures:
        parts.append(
            f'<figure><img src="{html.escape(fig.name)}" alt="{html.escape(fig.stem)}">'
            f"<figcaption>{html.escape(CAPTIONS.get(fig.name, ''))}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _front_keys(df: pd.DataFrame) -> list[tuple[str, int]]:
    return [(str(r["sweep"]), int(r["trial"])) for r in _records(_front(df))]


def _link(links: dict[tuple[str, int], str], key: tuple[str, int]) -> str:
    return f' · <a href="{html.escape(links[key])}">features</a>' if key in links else ""


def _write_all(
    df: pd.DataFrame, report_dir: Path, title: str, figures: Sequence[str] | None, features: Any
) -> Path:
    written = write_tables(df, report_dir)
    pngs = write_plots(df, report_dir, figures)
    links = build_browsers(df, report_dir, features) if features else {}
    page = report_dir / "index.html"
    rundir.write_text(page, render_page(df, pngs, title, links))
    for path in [*written, *pngs, page]:
        print(f"wrote {path}")
    return page


def write_report(
    sweep_dir: str | Path,
    study_name: str | None = None,
    progress: bool = True,
    storage: str | Path | None = None,
    features: Any = True,
) -> Path:
    """Collect one sweep and write <sweep_dir>/report/: trials.csv, table.md, the PNGs and index.html.

    Returns the path of index.html. (study_name / storage: see study.load_trials.) features: build
    the Pareto trials' feature browsers and link them (True, or a FeaturesConfig), or not (False).
    """
    sweep_dir = Path(sweep_dir)
    df = collect(sweep_dir, study_name=study_name, progress=progress, storage=storage)
    return _write_all(df, sweep_dir / "report", f"Sweep report: {sweep_dir.name}", None, features)


def compare_report(
    sweep_dirs: Sequence[str | Path],
    out_dir: str | Path,
    study_name: str | None = None,
    progress: bool = True,
    storage: str | Path | None = None,
    features: Any = True,
) -> Path:
    """Several sweeps in one report in out_dir: their frontiers overlaid, one table with a sweep column."""
    df = collect(list(sweep_dirs), study_name=study_name, progress=progress, storage=storage)
    title = "Sweep comparison: " + " vs ".join(df.attrs["sweeps"])
    return _write_all(df, Path(out_dir), title, ["frontier.png"], features)
