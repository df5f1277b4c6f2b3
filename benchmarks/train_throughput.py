"""Training-step throughput of each path against a GEMM measured in the same process.

    python -m benchmarks.train_throughput                      # d_in 768, hidden 4096 and 16384
    python -m benchmarks.train_throughput --hidden 4096 --steps 3 --arch topk batchtopk
    python -m benchmarks.train_throughput --hidden 4096 --arch topk --loop-steps 12   # + the training loop

Prints one JSON line per (architecture, path, shape): tokens/s, the step's achieved FLOP/s counted
as 12 * d_in * hidden per token (the dense SAE's cost, so sparse paths can exceed the GEMM rate),
and that as a fraction of a same-shape fp32 GEMM's FLOP/s measured just before. Synthetic random
inputs: throughput does not depend on the data's content.

The TopK family's sparse step is bounded by its dense encoder GEMM plus the top-k over [batch, hidden]
(everything else touches only the k selected latents per token); a "bound" line gives that bound's
tokens/s, measured in the same process, and each sparse step's fraction of it. BatchTopK runs at the
same mean L0 (k per token on average); a "batchtopk_over_topk" line gives its step time over TopK's.
With --loop-steps N, the TopK family also trains N steps through the real training loop (data from
shards in a temporary folder, scaling, dead-latent bookkeeping, logging), reported as in-loop
tokens/s (the run's own train_seconds) and its fraction of the bound, both over the whole run and
in the steady state after the first logged interval (curves.csv, a row every 2 steps): the first
step's one-off costs (buffers and Adam state allocated and faulted in) weigh on a run of a dozen
steps, not on one of thousands.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sae_sweep.models import architecture, build_sae, model_config
from sae_sweep.train.optim import Adam, clip_gradients

TOPK_FAMILY = ("topk", "batchtopk")


def gemm_flops(batch: int, d_in: int, hidden: int, repeats: int = 5) -> float:
    """FLOP/s of the encoder-shaped fp32 GEMM [B, D] @ [D, H] on this machine, now."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, hidden)
    out = a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    return 2 * batch * d_in * hidden * repeats / (time.perf_counter() - start)


def bound_time(batch: int, d_in: int, hidden: int, k: int, repeats: int = 3) -> float:
    """Seconds of the TopK step's floor: the encoder GEMM (with bias) plus the per-token top-k."""
    x, W, b = torch.randn(batch, d_in), torch.randn(d_in, hidden), torch.randn(hidden)
    pre = torch.addmm(b, x, W)  # reused, as the sparse step reuses its pre-activation buffer on CPU
    pre.topk(k, dim=-1, sorted=False)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.addmm(b, x, W, out=pre).topk(k, dim=-1, sorted=False)
    return (time.perf_counter() - start) / repeats


def in_loop_tokens_s(
    arch: str, batch: int, d_in: int, hidden: int, k: int, steps: int, root: Path
) -> tuple[float, float]:
    """Tokens/s of `steps` steps through the training loop (the run's train_seconds), on random shards:
    over the whole run, and from the first logged row (2 steps) to the last (nan for under 4 steps)."""
    from benchmarks.sweep_packing import write_shards
    from sae_sweep import compose_config
    from sae_sweep.errors import TrainingCollapsed
    from sae_sweep.rundir import CURVES, read_metrics
    from sae_sweep.train.trainer import train

    data = root / f"shards_{d_in}"
    if not data.exists():
        data.mkdir()
        write_shards(data, max(4 * batch, 65536), d_in)
    cfg = compose_config(
        [
            f"model={arch}",
            f"model.k={k}",
            f"hidden_dim={hidden}",
            f"batch_size={batch}",
            f"tokens={batch * steps}",
            "device=cpu",
            "data=shards",
            f"data.path={data}",
            "train.progress=false",
            f"train.log_every_tokens={2 * batch}",
        ],
        out_dir=root / f"run_{arch}_{hidden}",
    )
    try:
        metrics = train(cfg)
    except TrainingCollapsed:  # a few steps on random data may explain nothing; the speed still counts
        metrics = read_metrics(cfg.out_dir) or {}
    rows = list(csv.DictReader((Path(cfg.out_dir) / CURVES).open()))
    seconds = [float(r["tokens"]) / float(r["tokens_per_s"]) for r in rows]
    steady = float("nan")
    if len(rows) >= 2:
        steady = (float(rows[-1]["tokens"]) - float(rows[0]["tokens"])) / (seconds[-1] - seconds[0])
    return float(metrics.get("tokens_per_s", float("nan"))), steady


def step_time(arch: str, sparse: bool, batch: int, d_in: int, hidden: int, k: int, steps: int) -> float:
    """Seconds per full training step (forward, backward, clip, Adam, hooks) after one warm-up step."""
    topk_keys = {"k": k, "sparse_kernels": sparse} if architecture(arch).family == "topk" else {}
    cfg = model_config(arch, **topk_keys)
    sae = build_sae(cfg, d_in, hidden, torch.Generator().manual_seed(0))
    opt = Adam(sae.parameters(), lr=1e-4, fused=True)  # the trainer's optimizer and clipping
    x = torch.randn(batch, d_in) * 2

    def one() -> None:
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        (out.mse + out.sparsity + out.aux).backward()
        with torch.no_grad():
            sae.before_optimizer_step()
        clip_gradients(sae.parameters(), 1.0)
        opt.step()
        sae.after_optimizer_step(out.fired_H, batch)

    one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--arch", nargs="+", default=["relu", "topk", "batchtopk"])
    p.add_argument("--loop-steps", type=int, default=0, help="also train this many steps in the loop")
    args = p.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            measure(args, hidden, machine, Path(tmp))


def measure(args: argparse.Namespace, hidden: int, machine: dict, root: Path) -> None:
    gemm = gemm_flops(args.batch, args.d_in, hidden)
    print(
        json.dumps(
            {
                "bench": "gemm",
                "d_in": args.d_in,
                "hidden": hidden,
                "batch": args.batch,
                "gflop_s": round(gemm / 1e9, 1),
                **machine,
            }
        ),
        flush=True,
    )
    bound = None
    if any(a in TOPK_FAMILY for a in args.arch):
        bound = args.batch / bound_time(args.batch, args.d_in, hidden, args.k)
        row = {"bench": "bound", "what": "encoder GEMM + top-k", "d_in": args.d_in, "hidden": hidden}
        print(json.dumps({**row, "k": args.k, "batch": args.batch, "tokens_per_s": round(bound)}), flush=True)
    sparse_s: dict[str, float] = {}
    for arch in args.arch:
        for sparse in [True, False] if arch in TOPK_FAMILY else [False]:
            seconds = step_time(arch, sparse, args.batch, args.d_in, hidden, args.k, args.steps)
            if sparse:
                sparse_s[arch] = seconds
            tokens_s = args.batch / seconds
            flops = 12 * args.d_in * hidden * tokens_s
            row = {
                "bench": "train_step",
                "arch": arch,
                "path": "sparse" if sparse else "dense",
                "d_in": args.d_in,
                "hidden": hidden,
                "batch": args.batch,
                "k": args.k if arch in TOPK_FAMILY else None,
                "tokens_per_s": round(tokens_s),
                "dense_equiv_gflop_s": round(flops / 1e9, 1),
                "fraction_of_gemm": round(flops / gemm, 3),
            }
            if sparse and bound is not None:
                row["fraction_of_bound"] = round(tokens_s / bound, 3)
            print(json.dumps(row), flush=True)
    if "topk" in sparse_s and "batchtopk" in sparse_s:
        ratio = round(sparse_s["batchtopk"] / sparse_s["topk"], 3)
        print(
            json.dumps({"bench": "batchtopk_over_topk", "hidden": hidden, "step_time_ratio": ratio}),
            flush=True,
        )
    if args.loop_steps > 0 and bound is not None:
        for arch in (a for a in args.arch if a in TOPK_FAMILY):
            tokens_s, steady = in_loop_tokens_s(
                arch, args.batch, args.d_in, hidden, args.k, args.loop_steps, root
            )
            row = {"bench": "in_loop", "arch": arch, "d_in": args.d_in, "hidden": hidden, "batch": args.batch}
            print(
                json.dumps(
                    {
                        **row,
                        "steps": args.loop_steps,
                        "tokens_per_s": round(tokens_s),
                        "fraction_of_bound": round(tokens_s / bound, 3),
                        "steady_tokens_per_s": round(steady) if steady == steady else None,
                        "steady_fraction_of_bound": round(steady / bound, 3) if steady == steady else None,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
