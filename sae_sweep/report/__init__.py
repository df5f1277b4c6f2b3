"""Sweep reports: `collect(sweep_dirs)` -> one DataFrame; `write_report(sweep_dir)` -> report/ files.

    from sae_sweep.report import collect, write_report
    df = collect("outputs/my_study")          # one row per trial, a `pareto` column, df.attrs["swept"]
    write_report("outputs/my_study")          # report/trials.csv, table.md, *.png, index.html

`python -m sae_sweep.report DIR [DIR ...]` does the same from the shell; several directories also get
a comparison (their frontiers overlaid in one figure).
"""

from sae_sweep.report.collect import collect, latest_sweep, load_curves, load_density
from sae_sweep.report.page import compare_report, write_report
from sae_sweep.report.pareto import pareto_mask

__all__ = [
    "collect",
    "compare_report",
    "latest_sweep",
    "load_curves",
    "load_density",
    "pareto_mask",
    "write_report",
]
