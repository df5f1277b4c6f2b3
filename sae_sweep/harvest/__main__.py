"""CLI: `python -m sae_sweep.harvest model=... layer=N out=DIR [key=value ...]` (see --help)."""

from __future__ import annotations

import sys

from sae_sweep.errors import SaeSweepError
from sae_sweep.harvest import harvest, parse_args
from sae_sweep.harvest.config import keys_help

USAGE = """usage: python -m sae_sweep.harvest model=PATH_OR_NAME layer=N out=DIR [key=value ...]

Runs a transformers model over text and writes one layer's activations as shards that
`python -m sae_sweep data=shards data.path=DIR` trains on. Offline: the model must be a local folder
or already in the Hugging Face cache. Re-running the same command resumes an interrupted harvest.

keys:
"""


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE + keys_help())
        return 0
    try:
        cfg = parse_args(argv)
        manifest = harvest(cfg)
    except SaeSweepError as err:
        print(f"sae_sweep.harvest: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sae_sweep.harvest: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    note = " (the text ran out first)" if manifest.get("text_exhausted") else ""
    print(
        f"{cfg.out}: {manifest['tokens']} tokens x d_in {manifest['d_in']} in {len(manifest['shards'])} "
        f"shards{note}; {manifest['model']} {manifest['hook_name']}"
    )
    print(f"train on it: python -m sae_sweep data=shards data.path={cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
