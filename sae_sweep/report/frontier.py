"""The L0 / FVU frontier figure: completed trials on log axes, each sweep's Pareto front drawn through
its Pareto trials (several sweeps: one colour and marker per sweep)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sae_sweep.report.encodings import (
    MARKERS,
    SHORT,
    ColorScale,
    color_param,
    completed,
    fmt_value,
    marker_map,
    not_shown_note,
    plain_log_labels,
    set_titles,
    settings_label,
    swept_params,
)

MAX_FRONT_LABELS = 12


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
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
    set_titles(fig, ax, title, not_shown_note(df, points))
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
    front = pareto_front(points)
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
        front = pareto_front(mine)
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
