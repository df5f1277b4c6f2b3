"""What every figure shares: which trials are shown, how a parameter becomes colours, markers and an
axis scale, and labels of settings and values.

Figures are built without pyplot (see plots.py), so nothing here needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, NullLocator

from sae_sweep.report.collect import COMPLETED

MAX_DISCRETE = 10  # more distinct values than this get a colour bar instead of a legend
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MAX_TICKS = 8  # a parameter with at most this many values is ticked at each
# Preferred parameter for colour: the sparsity knob the frontier is about.
COLOR_FIRST = ("l1_lambda", "model.k", "architecture")
SHORT = {"l1_lambda": "λ", "batch_size": "batch", "hidden_dim": "hidden", "architecture": "arch"}


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


def is_numeric(values: pd.Series) -> bool:
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
        if len(values) <= MAX_DISCRETE or not is_numeric(series):
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
    if not is_numeric(values):
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
    if is_numeric(data[param]) and param != "seed":
        return data[param]
    return data[param].map(fmt_value)


def set_titles(fig: Figure, ax: Axes, title: str, note: str) -> None:
    """A title, and under it in grey what the figure leaves out (kept clear of the axis labels)."""
    if note:
        fig.suptitle(title)
        ax.set_title(note, fontsize=9, color="0.35")
    else:
        ax.set_title(title)
