"""Figures of a sweep: the L0/FVU frontier, dead latents vs l1_lambda, metrics vs each swept parameter,
training curves and feature-density histograms.

Every function takes the collector's frame and returns a matplotlib Figure (None when the sweep has
nothing to show, e.g. no l1_lambda for a TopK sweep). Figures are built without pyplot, so they save
with the Agg canvas anywhere (no display needed) and also show inline in a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, LogFormatter, NullLocator

from sae_sweep import rundir
from sae_sweep.metrics import METRICS, PANELS
from sae_sweep.report.collect import COMPLETED, load_curves, load_density

DPI = 120
MAX_DISCRETE = 10  # more distinct values than this get a colour bar instead of a legend
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
MAX_DENSITY_TRIALS = 8
DENSITY_BINS = 40
MAX_FRONT_LABELS = 12
MAX_TICKS = 8  # a parameter with at most this many values is ticked at each
# Preferred parameter for colour: the sparsity knob the frontier is about.
COLOR_FIRST = ("l1_lambda", "model.k", "architecture")
SHORT = {"l1_lambda": "λ", "batch_size": "batch", "hidden_dim": "hidden", "architecture": "arch"}
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


def fmt_value(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:g}"
    return str(value)


def settings_label(row: pd.Series, params: Sequence[str]) -> str:
    return ", ".join(
        f"{SHORT.get(p, p)}={fmt_value(row[p])}" for p in params if p in row and bool(pd.notna(row[p]))
    )


def completed(df: pd.DataFrame) -> pd.DataFrame:
    """Completed trials whose L0 and FVU can sit on log axes."""
    ok = df["status"].eq(COMPLETED) & (df["l0"] > 0) & (df["fvu"] > 0)
    return df.loc[ok]


def not_shown_note(df: pd.DataFrame, shown: pd.DataFrame) -> str:
    rest = df.drop(index=shown.index)
    if rest.empty:
        return ""
    counts = ", ".join(f"{n} {s}" for s, n in rest["status"].fillna("unknown").value_counts().items())
    return f"not shown (no held-out metrics): {counts}"


def swept_params(df: pd.DataFrame) -> list[str]:
    return [p for p in df.attrs.get("swept", []) if p in df and df[p].notna().any()]


def color_param(df: pd.DataFrame) -> str | None:
    swept = swept_params(df)
    for name in COLOR_FIRST:
        if name in swept:
            return name
    return swept[0] if swept else None


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


# --- encodings: a parameter -> colours / markers --------------------------------------------------


@dataclass
class ColorScale:
    """Colours for one parameter: a legend of values when few, a colour bar (log / symlog) when many."""

    param: str | None
    values: list[Any]
    norm: Normalize | None = None
    cmap: Any = None

    @classmethod
    def of(cls, df: pd.DataFrame, param: str | None) -> ColorScale:
        if param is None:
            return cls(None, [None])
        series = df[param].dropna()
        values = sorted(series.unique(), key=lambda v: (isinstance(v, str), v))
        if len(values) <= MAX_DISCRETE or not _is_numeric(series):
            return cls(param, values)
        return cls(param, values, norm=value_norm(np.asarray(values, float)), cmap=mpl.colormaps["viridis"])

    def color(self, value: Any) -> Any:
        if self.norm is not None:
            return self.cmap(self.norm(value))
        if self.param is None or value not in self.values:
            return "0.3"
        i, n = self.values.index(value), len(self.values)
        if all(isinstance(v, str) for v in self.values):
            return mpl.colormaps["tab10"](i % 10)
        return mpl.colormaps["viridis"](0.9 * i / max(n - 1, 1))  # ordered values, 0 included

    def handles(self, present: Sequence[Any] | None = None) -> list[Line2D]:
        """Legend entries of the values (those in `present` only, when given); none for a colour bar."""
        if self.param is None or self.norm is not None:
            return []
        shown = [v for v in self.values if present is None or v in set(present)]
        return [
            Line2D([], [], ls="", marker="o", ms=8, color=self.color(v), label=fmt_value(v)) for v in shown
        ]

    def key(self, fig: Figure, ax: Axes, present: Sequence[Any] | None = None, **legend_kw: Any) -> None:
        """The colour key: a legend on ax (kept beside any later legend), or a colour bar."""
        if self.param is None:
            return
        if self.norm is not None:
            sm = ScalarMappable(norm=self.norm, cmap=self.cmap)
            fig.colorbar(sm, ax=ax, label=self.param + _norm_note(self.norm))
            return
        legend_kw.setdefault("title", self.param)
        legend = ax.legend(handles=self.handles(present), **legend_kw)
        ax.add_artist(legend)  # so that a second ax.legend() call does not replace it


def value_norm(values: np.ndarray) -> Normalize:
    pos = values[values > 0]
    if (values < 0).any() or len(pos) == 0 or pos.max() / pos.min() < 5:
        return Normalize(values.min(), values.max())
    if (values == 0).any():
        return SymLogNorm(linthresh=pos.min(), vmin=0, vmax=pos.max())
    return LogNorm(pos.min(), pos.max())


def _norm_note(norm: Normalize) -> str:
    if isinstance(norm, SymLogNorm):
        return f" (symlog: linear below {norm.linthresh:g}, so 0 fits)"
    return " (log)" if isinstance(norm, LogNorm) else ""


def marker_map(df: pd.DataFrame, param: str | None) -> dict[Any, str]:
    if param is None:
        return {}
    values = sorted(df[param].dropna().unique(), key=lambda v: (isinstance(v, str), v))
    return dict(zip(values, MARKERS, strict=False)) if len(values) <= len(MARKERS) else {}


def set_param_scale(ax: Axes, values: pd.Series, axis: str = "x") -> str:
    """Log / symlog / linear axis for a parameter's values, ticked at the values themselves when few;
    returns the note for the axis label.

    Hyperparameters are swept over ratios, so a positive parameter gets a log axis; with 0 among its
    values (l1_lambda=0, the dense baseline) a symlog axis, linear below the smallest positive value,
    so 0 still has a place.
    """
    if not _is_numeric(values):
        return ""
    v = np.unique(values.dropna().to_numpy(float))
    pos = v[v > 0]
    target = ax.xaxis if axis == "x" else ax.yaxis
    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    note = ""
    if len(v) >= 2 and (v >= 0).all() and len(pos):
        if (v == 0).any():
            setter("symlog", linthresh=pos.min(), linscale=0.5)
            note = " (symlog axis, so 0 fits)"
        elif pos.max() / pos.min() >= 2:
            setter("log")
            note = " (log axis)"
    if 1 <= len(v) <= MAX_TICKS:
        target.set_ticks(v, labels=[fmt_value(x) for x in v])
        target.set_minor_locator(NullLocator())
    return note


class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (0.02, 30) rather than 2×10⁻²; which ticks get a label
    is still LogFormatter's choice (minor ones only when the axis spans few decades)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_labels(axis: Any) -> None:
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(minor_thresholds=(2, 0.5)))  # some minor labels to 2 decades


def param_values(data: pd.DataFrame, param: str) -> pd.Series:
    """A parameter's values for an axis: numbers, or labels for names and seeds (no order to show)."""
    if _is_numeric(data[param]) and param != "seed":
        return data[param]
    return data[param].map(fmt_value)


def _titles(fig: Figure, ax: Axes, title: str, note: str) -> None:
    """A title, and under it in grey what the figure leaves out (kept clear of the axis labels)."""
    if note:
        fig.suptitle(title)
        ax.set_title(note, fontsize=9, color="0.35")
    else:
        ax.set_title(title)


# --- the frontier -----------------------------------------------------------------------------------


def _front(points: pd.DataFrame) -> pd.DataFrame:
    return points.loc[points["pareto"]].sort_values(["l0", "fvu"])


def _reference_lines(ax: Axes) -> None:
    low, high = ax.get_ylim()
    for fvu, text in ((0.01, "99% variance explained"), (0.1, "90% variance explained")):
        if low < fvu < high:
            ax.axhline(fvu, color="0.6", lw=0.8, ls=":", zorder=0)
            ax.annotate(
                text,
                (0, fvu),  # left: low L0 with low FVU is the region no trial reaches
                xycoords=("axes fraction", "data"),
                xytext=(4, 3),
                textcoords="offset points",
                ha="left",
                fontsize=8,
                color="0.4",
            )
    ax.set_ylim(low, high)


def frontier_figure(df: pd.DataFrame) -> Figure:
    """L0 vs FVU on log axes; completed trials coloured by the swept parameter, each sweep's front
    drawn through its Pareto trials (several sweeps: one colour and marker per sweep)."""
    fig = Figure(figsize=(9, 6.2), layout="constrained")
    ax = fig.add_subplot()
    points = completed(df)
    sweeps = list(dict.fromkeys(df["sweep"]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    if len(sweeps) > 1:
        _overlay_sweeps(ax, points, sweeps)
        title = "Sparsity vs reconstruction: " + " vs ".join(sweeps)
    else:
        _single_sweep(fig, ax, points, df)
        title = f"{sweeps[0]}: sparsity vs reconstruction ({len(points)} completed trials)"
    plain_log_labels(ax.xaxis)
    plain_log_labels(ax.yaxis)
    ax.set_xlabel("L0: mean active latents per token (log axis; lower = sparser)")
    ax.set_ylabel("FVU = 1 − explained variance (log axis; lower = better)")
    ax.grid(True, which="major", alpha=0.3)
    if len(points):
        ax.margins(x=0.08, y=0.08)
        _reference_lines(ax)
    else:
        ax.text(0.5, 0.5, "no completed trial yet", transform=ax.transAxes, ha="center", color="0.4")
    ax.annotate("better ↙", (0.01, 0.01), xycoords="axes fraction", fontsize=9, color="0.4")
    _titles(fig, ax, title, not_shown_note(df, points))
    return fig


def _label_front(ax: Axes, front: pd.DataFrame, params: Sequence[str]) -> None:
    """Label each front point with its settings, below-left of it: no trial can sit there (it would
    dominate the point); the sparsest point's label goes right, away from the axis edge."""
    if len(front) > MAX_FRONT_LABELS:
        return
    for i, (_, row) in enumerate(front.iterrows()):
        right = i == 0
        ax.annotate(
            f"#{row['trial']} " + settings_label(row, params),
            (row["l0"], row["fvu"]),
            xytext=(8 if right else -8, -8),
            textcoords="offset points",
            ha="left" if right else "right",
            va="top",
            fontsize=8,
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.7),
        )


def _single_sweep(fig: Figure, ax: Axes, points: pd.DataFrame, df: pd.DataFrame) -> None:
    swept = swept_params(df)
    cparam = color_param(df)
    mparam = next((p for p in swept if p != cparam), None)
    colors, markers = ColorScale.of(df, cparam), marker_map(df, mparam)
    for _, row in points.iterrows():
        ax.scatter(
            row["l0"],
            row["fvu"],
            s=80 if bool(row["pareto"]) else 45,
            zorder=3,
            color=colors.color(row[cparam]) if cparam else "C0",
            marker=markers.get(row[mparam], "o") if mparam else "o",
            edgecolors="black" if bool(row["pareto"]) else "none",
            linewidths=1.3,
        )
    front = _front(points)
    ax.plot(front["l0"], front["fvu"], color="black", lw=1.2, zorder=2)
    _label_front(ax, front, swept[:3])
    if cparam:
        title = cparam + (f" ({SHORT[cparam]})" if cparam in SHORT else "")
        colors.key(
            fig,
            ax,
            list(points[cparam]),
            title=title,
            loc="upper center",
            fontsize=8,
            title_fontsize=8,
            ncols=min(len(colors.values), 6),
        )
    handles = [
        Line2D(
            [],
            [],
            color="black",
            lw=1.2,
            marker="o",
            mfc="white",
            mec="black",
            label=f"Pareto front ({len(front)} trials, black edge)",
        )
    ]
    if mparam and markers:
        handles += [
            Line2D([], [], ls="", marker=m, color="0.3", label=f"{mparam}={fmt_value(v)}")
            for v, m in markers.items()
            if v in set(points[mparam])
        ]
    ax.legend(handles=handles, loc="upper right", fontsize=8)


def _overlay_sweeps(ax: Axes, points: pd.DataFrame, sweeps: list[str]) -> None:
    handles = []
    for i, name in enumerate(sweeps):
        color, marker = mpl.colormaps["tab10"](i % 10), MARKERS[i % len(MARKERS)]
        mine = points.loc[points["sweep"] == name]
        ax.scatter(mine["l0"], mine["fvu"], color=color, marker=marker, s=40, alpha=0.5, zorder=3)
        front = _front(mine)
        ax.plot(front["l0"], front["fvu"], color=color, lw=2, marker=marker, ms=8, mec="black", zorder=4)
        handles.append(
            Line2D(
                [],
                [],
                color=color,
                lw=2,
                marker=marker,
                mec="black",
                label=f"{name}: Pareto front ({len(front)} of {len(mine)} trials)",
            )
        )
    handles.append(Line2D([], [], ls="", marker="o", color="0.5", alpha=0.5, label="other trials (faint)"))
    ax.legend(handles=handles, loc="upper right", fontsize=9)


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
    front = _spread(_front(completed(df)), MAX_DENSITY_TRIALS)
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
