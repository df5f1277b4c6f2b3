"""CLI: `python -m sae_sweep.features RUN_DIR [key=value ...]` writes RUN_DIR/features/index.html."""

from __future__ import annotations

import sys

from sae_sweep.checks import field_docs
from sae_sweep.errors import SaeSweepError
from sae_sweep.features import FeaturesConfig, build_features, parse_args

USAGE = """usage: python -m sae_sweep.features RUN_DIR [key=value ...]

Writes a static feature browser of a trained run: RUN_DIR/features/index.html and one page per shown
latent (density, activation histogram, top and random held-out contexts, logit effects).

keys:
"""


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n".join(f"  {k:<16} {v}" for k, v in field_docs(FeaturesConfig).items()))
        return 0
    try:
        run_dir, cfg = parse_args(argv)
        index = build_features(run_dir, cfg)
    except SaeSweepError as err:
        print(f"sae_sweep.features: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
