"""`python -m sae_sweep.report DIR [DIR ...]`: write each sweep's report/ and, for several, a comparison."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sae_sweep.report.page import compare_report, write_report


def default_compare_dir(dirs: Sequence[Path]) -> Path:
    """outputs/compare-<a>-vs-<b> beside the first sweep."""
    return dirs[0].resolve().parent / ("compare-" + "-vs-".join(d.resolve().name for d in dirs))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sae_sweep.report",
        description="Tables, plots and a report page for finished (or running) sweeps. Each DIR gets "
        "DIR/report/ (trials.csv, table.md, PNG figures, index.html); with several DIRs a comparison "
        "with their L0/FVU frontiers overlaid is written to --out as well.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep directory (outputs/<study>)")
    parser.add_argument(
        "--out", type=Path, help="comparison directory (default: compare-A-vs-B beside DIR 1)"
    )
    parser.add_argument("--study", help="study name, when a storage holds several")
    parser.add_argument(
        "--storage",
        help="study storage (file or database URL) when it is not in DIR nor in the trials' config",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-features",
        action="store_true",
        help="do not build the Pareto trials' feature browsers (python -m sae_sweep.features)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"sae_sweep.report: error: no such sweep directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    kw = dict(
        study_name=args.study, progress=not args.quiet, storage=args.storage, features=not args.no_features
    )
    pages = [write_report(d, **kw) for d in args.dirs]
    if len(args.dirs) > 1:
        out = args.out or default_compare_dir(args.dirs)
        pages.append(compare_report(args.dirs, out, **kw))
    print("report: " + " ".join(str(p) for p in pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
