"""Every benchmark in one run, then the issue-5 targets checked against what it measured.

    python -m benchmarks                 # the peer from $SAE_SWEEP_PEER_PYTHON or /tmp/saelens-venv
    python -m benchmarks --peer-python /path/to/venv/bin/python --quick

Each benchmark runs in its own process (the shard reader measures its own peak memory) and its JSON
lines are passed through; the last lines are {"bench": "target", ...} rows with the figure, the target
and whether it is met. The peer (SAELens) is skipped, and its targets reported as not measured, when no
peer Python is given or found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_PEER = Path("/tmp/saelens-venv/bin/python")


def run(module: str, args: list[str]) -> list[dict]:
    """Run `python -m benchmarks.<module> args`, echo its lines, return the JSON ones."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
    print(f"# {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    rows = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    if proc.wait() != 0:
        print(json.dumps({"bench": module, "error": f"exit status {proc.returncode}"}), flush=True)
    return rows


def target(name: str, value: float | None, goal: float) -> dict:
    met = None if value is None else value >= goal
    return {"bench": "target", "what": name, "value": value, "at_least": goal, "met": met}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env_peer = os.environ.get("SAE_SWEEP_PEER_PYTHON")
    default_peer = env_peer or (str(DEFAULT_PEER) if DEFAULT_PEER.exists() else None)
    p.add_argument("--peer-python", default=default_peer, help="Python of a venv with sae-lens installed")
    p.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not figures to quote)")
    args = p.parse_args()
    quick = args.quick

    steps = ["--steps", "1"] if quick else []
    train = run("train_throughput", [*steps, *(["--hidden", "4096"] if quick else [])])
    peer_args = ["--peer-python", args.peer_python] if args.peer_python else []
    peer = run("peer_saelens", [*peer_args, *steps])
    packing = run("sweep_packing", ["--tokens", "200000", "--trials", "4", "--steps", "1"] if quick else [])
    run("shard_reader", ["--gb", "0.25", "--buffer-mb", "32"] if quick else [])

    relu = next(
        (r for r in train if r.get("arch") == "relu" and r.get("hidden") == 4096 and "fraction_of_gemm" in r),
        None,
    )
    ratio = next((r for r in peer if "sae_sweep_over_best_sae_lens" in r and r.get("hidden") == 4096), None)
    wide = next((r for r in peer if "sae_sweep_h16384_over_sae_lens_h4096" in r), None)
    packed = next((r for r in packing if "packed_over_one_by_one" in r), None)
    checks = [
        target(
            "relu dense step, fraction of fp32 GEMM FLOP/s (d 768, h 4096)",
            relu["fraction_of_gemm"] if relu else None,
            0.7,
        ),
        target(
            "topk tokens/s over SAELens (d 768, h 4096, k 32)",
            ratio["sae_sweep_over_best_sae_lens"] if ratio else None,
            3.0,
        ),
        target(
            "topk h16384 tokens/s over SAELens h4096",
            wide["sae_sweep_h16384_over_sae_lens_h4096"] if wide else None,
            1.0,
        ),
        target(
            "packed sweep over one by one (trial-tokens/s)",
            packed["packed_over_one_by_one"] if packed else None,
            1.0,
        ),
    ]
    for row in checks:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
