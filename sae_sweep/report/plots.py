"""Figures of a sweep: the L0/FVU frontier, dead latents vs l1_lambda, metrics vs each swept parameter,
training curves and feature-density histograms.

Every function takes the collector's frame and returns a matplotlib Figure (None when the sweep has
nothing to show, e.g. no l1_lambda for a TopK sweep). Figures are built without pyplot, so they save
with the Agg canvas anywhere (no display needed) and also show inline in a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from sae_sweep import rundir
from sae_sweep.metrics import METRICS, PANELS
from sae_sweep.report.collect import COMPLETED, load_curves, load_density
from sae_sweep.report.encodings import (
    ColorScale,
    color_param,
    completed,
    fmt_value,
    param_values,
    plain_log_labels,
    set_param_scale,
    settings_label,
    swept_params,
)
from sae_sweep.report.frontier import frontier_figure, pareto_front

DPI = 120
LINESTYLES = ("-", "--", ":", "-.")
MAX_DENSITY_TRIALS = 8
DENSITY_BINS = 40
# (column, axis label, log axis) of the metric panels (metrics.PANELS); a percentage of a fraction is
# the column <name without _frac>_pct, e.g. dead_pct = 100 * dead_frac.
PANEL_METRICS = tuple(
    (
        name.removesuffix("_frac") + "_pct" if m.percent else name,
        m.axis or m.label or m.name,
        m.log,
    )
    for name, m in ((n, METRICS[n]) for n in PANELS)
)


# --- dead latents vs l1_lambda ----------------------------------------------------------------------


def dead_figure(df: pd.DataFrame) -> Figure | None:
    """Dead % against l1_lambda, one line per lr; runs that stopped early at their last logged value."""
    if "l1_lambda" not in df or df["l1_lambda"].dropna().nunique() < 2:
        return None
    data = df.assign(dead_pct=100 * df["dead_frac"])
    group = "lr" if "lr" in swept_params(df) else None
    colors = ColorScale.of(df, group)
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    done = data.loc[data["status"].eq(COMPLETED)]
    for value in colors.values:
        mine = done if group is None else done.loc[done[group] == value]
        if mine.empty:
            continue
        color = colors.color(value)
        means = mine.groupby("l1_lambda")["dead_pct"].mean()
        label = f"lr={fmt_value(value)}" if group else "completed runs"
        ax.plot(means.index, means.to_numpy(), color=color, marker="o", lw=1.5, label=label)
        if len(mine) > len(means):  # several runs per point (other swept parameters): show each
            ax.scatter(mine["l1_lambda"], mine["dead_pct"], color=color, s=12, alpha=0.5)
    if "last_train_dead_frac" in data:
        stopped = data.loc[data["status"].ne(COMPLETED) & data["last_train_dead_frac"].notna()]
        if len(stopped):
            ax.scatter(
                stopped["l1_lambda"],
                100 * stopped["last_train_dead_frac"],
                marker="x",
                s=70,
                zorder=3,
                color=[colors.color(v) for v in (stopped[group] if group else [None] * len(stopped))],
                label="stopped early (" + ", ".join(sorted(stopped["status"].unique())) + "): last logged",
            )
    note = set_param_scale(ax, df["l1_lambda"])
    ax.set_xlabel("l1_lambda" + note)
    window = df["dead_window_tokens"].dropna().max() if "dead_window_tokens" in df else math.nan
    within = f"silent over the last {window:,.0f} training tokens" if pd.notna(window) else "never fired"
    ax.set_ylabel(f"dead latents (%; {within})")
    ax.set_ylim(-3, 103)
    ax.set_title("Dead latents vs l1_lambda" + (", one line per lr" if group else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


# --- every metric against every swept parameter -------------------------------------------------


def metrics_figure(df: pd.DataFrame) -> Figure | None:
    """Small multiples: a row per swept parameter, a column per headline metric (completed trials);
    points coloured by another swept parameter to show interactions."""
    swept = swept_params(df)
    if not swept:
        return None
    done = df[df["status"].eq(COMPLETED)]
    data = done.assign(
        **{c: 100 * done[c.removesuffix("_pct") + "_frac"] for c, _, _ in PANEL_METRICS if c.endswith("_pct")}
    )
    metrics = [(c, label, log) for c, label, log in PANEL_METRICS if c in data and data[c].notna().any()]
    if data.empty or not metrics:
        return None
    nrows, ncols = len(swept), len(metrics)
    fig = Figure(figsize=(2.8 * ncols + 1.2, 2.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, param in enumerate(swept):
        other = next((p for p in swept if p != param), None)
        colors = ColorScale.of(df, other)
        point_colors = [colors.color(v) for v in (data[other] if other else [None] * len(data))]
        x = param_values(data, param)
        for c, (metric, label, log) in enumerate(metrics):
            ax = axes[r, c]
            ax.scatter(x, data[metric], s=24, color=point_colors)
            if log and (data[metric] > 0).any():
                ax.set_yscale("log")
                plain_log_labels(ax.yaxis)
            ax.set_xlabel(param + set_param_scale(ax, x), fontsize=8)
            ax.margins(x=0.1)  # points at the first and last value stay whole
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        if other and colors.norm is None:
            axes[r, -1].legend(
                handles=colors.handles(list(data[other])),
                title=other,
                fontsize=7,
                title_fontsize=7,
                loc="center left",
                bbox_to_anchor=(1.02, 0.5),
            )
        elif other:
            colors.key(fig, axes[r, -1])
    fig.suptitle(
        f"Held-out metrics vs each swept parameter ({len(data)} completed trials; "
        "colour = the other swept parameter)"
    )
    return fig


# --- training curves --------------------------------------------------------------------------------


def curves_figure(df: pd.DataFrame, curves: pd.DataFrame | None = None) -> Figure | None:
    """MSE, L0 and dead % against training tokens for every trial (stopped runs end in an x)."""
    curves = load_curves(df) if curves is None else curves
    if curves.empty:
        return None
    swept = swept_params(df)
    cparam = color_param(df)
    lparam = next((p for p in swept if p != cparam), None)
    colors = ColorScale.of(df, cparam)
    styles = {}
    if lparam is not None:
        values = sorted(df[lparam].dropna().unique(), key=lambda v: (isinstance(v, str), v))
        styles = dict(zip(values, LINESTYLES, strict=False)) if len(values) <= len(LINESTYLES) else {}
    panels = (
        ("mse", "MSE on training batches (log)", True),
        ("l0", "L0 on training batches (log)", True),
        ("dead_frac", "dead latents (%)", False),
    )
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    trials = df.set_index(["sweep", "trial"])
    for key, curve in curves.groupby(["sweep", "trial"], sort=False):
        row = trials.loc[key]  # (sweep, trial)
        color = colors.color(row[cparam]) if cparam else "C0"
        ls = styles.get(row[lparam], "-") if lparam else "-"
        stopped = row["status"] != COMPLETED
        for ax, (col, _, _) in zip(axes, panels, strict=True):
            y = curve[col] * (100 if col == "dead_frac" else 1)
            ax.plot(curve["tokens"], y, color=color, ls=ls, lw=1.0 if stopped else 1.6, alpha=0.9)
            if stopped:
                ax.plot(curve["tokens"].iloc[-1], y.iloc[-1], marker="x", color=color, ms=8)
    for ax, (_, label, log) in zip(axes, panels, strict=True):
        if log:
            ax.set_yscale("log")
            plain_log_labels(ax.yaxis)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[2].set_ylim(-3, 103)
    handles = colors.handles(list(df.loc[df["run_dir"].notna(), cparam])) if cparam else []
    if handles:
        handles.insert(0, Line2D([], [], ls="", label=f"colour: {cparam}"))
    if styles:
        handles.append(Line2D([], [], ls="", label=f"line: {lparam}"))
        handles += [Line2D([], [], color="0.3", ls=s, label=fmt_value(v)) for v, s in styles.items()]
    handles.append(Line2D([], [], color="0.3", marker="x", ls="", label="stopped early"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    if colors.norm is not None:
        colors.key(fig, axes[2])
    n = curves.groupby(["sweep", "trial"]).ngroups
    fig.suptitle(f"Training curves of {n} trials (dead = silent over the trailing dead window)")
    return fig


# --- feature density of the Pareto trials -----------------------------------------------------------


def _spread(front: pd.DataFrame, n: int) -> pd.DataFrame:
    if len(front) <= n:
        return front
    return front.iloc[np.unique(np.linspace(0, len(front) - 1, n).round().astype(int))]


def density_figure(df: pd.DataFrame) -> Figure | None:
    """log10 firing-density histograms (held-out split) of the Pareto trials on shared bins."""
    front = _spread(pareto_front(completed(df)), MAX_DENSITY_TRIALS)
    loaded = [
        (row, np.asarray(load_density(str(row["run_dir"])).get("density", []), float))
        for _, row in front.iterrows()
    ]
    loaded = [(row, d) for row, d in loaded if d.size]
    if not loaded:
        return None
    fired = np.concatenate([d[d > 0] for _, d in loaded])
    low = math.floor(np.log10(fired.min()) * 4) / 4 if fired.size else -6.0  # shared bins: comparable heights
    edges = np.linspace(low, 0.0, DENSITY_BINS + 1)
    swept = swept_params(df)
    fig = Figure(figsize=(9.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    cmap = mpl.colormaps["plasma"]
    for i, (row, density) in enumerate(loaded):
        color = cmap(0.85 * i / max(len(loaded) - 1, 1))
        counts, _ = np.histogram(np.log10(density[density > 0]), bins=edges)
        label = f"#{row['trial']} {settings_label(row, swept[:3])}: L0 {row['l0']:.3g}"
        never = int((density == 0).sum())
        label += f", {never} of {density.size} never fired" if never else ""
        ax.stairs(counts, edges, color=color, lw=1.8, label=label)
    ax.axvline(-1, color="0.5", ls="--", lw=1)
    ax.annotate(
        "dense: fires on > 10% of tokens →",
        (-1, 1),
        xycoords=("data", "axes fraction"),
        xytext=(4, -12),
        textcoords="offset points",
        fontsize=8,
        color="0.4",
    )
    ax.set_xlabel("log10 firing density (share of held-out tokens on which a latent fires)")
    ax.set_ylabel("latents per bin")
    ax.set_title(f"Feature density of the Pareto trials ({len(loaded)} shown, sparsest first)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


# --- all of them --------------------------------------------------------------------------------------

FIGURES = {
    "frontier.png": frontier_figure,
    "dead_vs_l1_lambda.png": dead_figure,
    "metrics_vs_params.png": metrics_figure,
    "curves.png": curves_figure,
    "density_pareto.png": density_figure,
}


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(path, lambda fh: fig.savefig(fh, dpi=DPI, format=path.suffix[1:] or "png"))
    return path


def write_plots(df: pd.DataFrame, report_dir: Path, names: Sequence[str] | None = None) -> list[Path]:
    """Every figure that has something to show, as report_dir/<name>.png; returns the paths written."""
    written = []
    for name, make in FIGURES.items():
        if names is not None and name not in names:
            continue
        fig = make(df)
        if fig is not None:
            written.append(save(fig, report_dir / name))
    return written
