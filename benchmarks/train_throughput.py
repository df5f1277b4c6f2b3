"""Training-step throughput of each path against a GEMM measured in the same process.

    python -m benchmarks.train_throughput                      # d_in 768, hidden 4096 and 16384
    python -m benchmarks.train_throughput --hidden 4096 --steps 3 --arch topk

Prints one JSON line per (architecture, path, shape): tokens/s, the step's achieved FLOP/s counted
as 12 * d_in * hidden per token (the dense SAE's cost, so sparse paths can exceed the GEMM rate),
and that as a fraction of a same-shape fp32 GEMM's FLOP/s measured just before. Synthetic random
inputs: throughput does not depend on the data's content.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from sae_sweep.config import ModelConfig
from sae_sweep.models import build_sae


def gemm_flops(batch: int, d_in: int, hidden: int, repeats: int = 5) -> float:
    """FLOP/s of the encoder-shaped fp32 GEMM [B, D] @ [D, H] on this machine, now."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, hidden)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * batch * d_in * hidden * repeats / (time.perf_counter() - start)


def step_time(arch: str, sparse: bool, batch: int, d_in: int, hidden: int, k: int, steps: int) -> float:
    """Seconds per full training step (forward, backward, clip, Adam, hooks) after one warm-up step."""
    cfg = ModelConfig(name=arch, k=k if arch in ("topk", "batchtopk") else None, sparse_kernels=sparse)
    sae = build_sae(cfg, d_in, hidden, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in) * 2

    def one() -> None:
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        (out.mse + out.sparsity + out.aux).backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0, foreach=True)
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
    p.add_argument("--arch", nargs="+", default=["relu", "topk"])
    args = p.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for hidden in args.hidden:
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
        for arch in args.arch:
            for sparse in [True, False] if arch == "topk" else [False]:
                seconds = step_time(arch, sparse, args.batch, args.d_in, hidden, args.k, args.steps)
                tokens_s = args.batch / seconds
                flops = 12 * args.d_in * hidden * tokens_s
                print(
                    json.dumps(
                        {
                            "bench": "train_step",
                            "arch": arch,
                            "path": "sparse" if sparse else "dense",
                            "d_in": args.d_in,
                            "hidden": hidden,
                            "batch": args.batch,
                            "k": args.k if arch == "topk" else None,
                            "tokens_per_s": round(tokens_s),
                            "dense_equiv_gflop_s": round(flops / 1e9, 1),
                            "fraction_of_gemm": round(flops / gemm, 3),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
