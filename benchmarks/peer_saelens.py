"""TopK training-step throughput: sae_sweep against SAELens, at the same shapes, in one run.

    python -m benchmarks.peer_saelens --peer-python /tmp/saelens-venv/bin/python

SAELens pulls ~80 packages, so it lives in a throwaway virtualenv beside the project's torch, e.g.

    python -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 sae-lens

This script measures sae_sweep in-process. It then runs itself under the peer's Python
(`--as-peer`) to measure SAELens's TopKTrainingSAE.training_forward_pass plus backward and Adam,
with and without its sparse-activations option. It prints one JSON line per measurement and the
ratios. Without --peer-python, or if sae_lens won't import there, the peer is skipped with a note.
"""

# sae_lens is imported only under the peer interpreter (--as-peer), never in this environment.
# pyright: reportMissingImports=false

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

SHAPES = [(768, 4096), (768, 16384)]


def _time(step, steps: int) -> float:
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def peer_step_time(d_in: int, hidden: int, k: int, batch: int, steps: int, sparse: bool) -> float:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=hidden, k=k, use_sparse_activations=sparse))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in) * 2
    dead = torch.zeros(hidden, dtype=torch.bool)

    def step() -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return _time(step, steps)


def ours_step_time(d_in: int, hidden: int, k: int, batch: int, steps: int) -> float:
    from benchmarks.train_throughput import step_time

    return step_time("topk", True, batch, d_in, hidden, k, steps)


def run_peer(args: argparse.Namespace) -> list[dict]:
    cmd = [
        args.peer_python,
        __file__,
        "--as-peer",
        "--k",
        str(args.k),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(json.dumps({"bench": "peer", "skipped": f"{args.peer_python}: {err}"}))
        return []
    if done.returncode != 0:
        print(json.dumps({"bench": "peer", "skipped": done.stderr.strip().splitlines()[-1:]}))
        return []
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", help="python of a virtualenv with sae-lens installed")
    p.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if args.as_peer:
        import sae_lens

        for d_in, hidden in SHAPES:
            for sparse in (False, True):
                row = {
                    "bench": "topk_step",
                    "library": f"sae_lens {sae_lens.__version__}",
                    "use_sparse_activations": sparse,
                    "d_in": d_in,
                    "hidden": hidden,
                }
                try:
                    seconds = peer_step_time(d_in, hidden, args.k, args.batch, args.steps, sparse)
                    row["tokens_per_s"] = round(args.batch / seconds)
                except Exception as err:  # the peer's options are not all implemented on every device
                    row["failed"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                print(json.dumps(row), flush=True)
        return
    ours = {}
    for d_in, hidden in SHAPES:
        tokens_s = args.batch / ours_step_time(d_in, hidden, args.k, args.batch, args.steps)
        ours[(d_in, hidden)] = tokens_s
        print(
            json.dumps(
                {
                    "bench": "topk_step",
                    "library": "sae_sweep (sparse path)",
                    "d_in": d_in,
                    "hidden": hidden,
                    "tokens_per_s": round(tokens_s),
                }
            ),
            flush=True,
        )
    if not args.peer_python:
        print(json.dumps({"bench": "peer", "skipped": "no --peer-python given"}))
        return
    peer = run_peer(args)
    for row in peer:
        print(json.dumps(row), flush=True)
    best = {}
    for row in peer:
        if "tokens_per_s" in row:
            key = (row["d_in"], row["hidden"])
            best[key] = max(best.get(key, 0), row["tokens_per_s"])
    for key, tokens_s in best.items():
        print(
            json.dumps(
                {
                    "bench": "ratio",
                    "d_in": key[0],
                    "hidden": key[1],
                    "sae_sweep_over_best_sae_lens": round(ours[key] / tokens_s, 2),
                }
            )
        )
    if (768, 4096) in best and (768, 16384) in ours:
        print(
            json.dumps(
                {
                    "bench": "ratio",
                    "sae_sweep_h16384_over_sae_lens_h4096": round(ours[(768, 16384)] / best[(768, 4096)], 2),
                }
            )
        )


if __name__ == "__main__":
    sys.exit(main())
