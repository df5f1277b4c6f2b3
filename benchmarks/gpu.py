"""The GPU figures in one command (about 5 minutes on one H100-class GPU; at most 8).

    python -m benchmarks.gpu                      # on a machine with CUDA; writes gpu_results/
    python -m benchmarks.gpu --out DIR --peak-tflops 989
    python -m benchmarks.gpu --device cpu --tiny  # every piece at toy sizes: checks the script, no figures

Pieces (each prints one JSON line per figure; all of them end up in DIR/gpu.json and DIR/gpu.md):
- dense_mfu:  relu training step under bf16 autocast at d_in 3072 x hidden 16384, batch 8192: model
              FLOP/s (12 * d_in * hidden per token) over the GPU's dense bf16 peak (--peak-tflops, or
              a table by device name), and over a bf16 GEMM of the encoder's shape measured just before.
- topk:       TopK training step tokens/s at d_in 768 x hidden 32768, k 32, batch 16384, with
              model.kernels=torch and model.kernels=triton, and the ratio.
- stacked:    8 and 32 small relu trials (d_in 768 x hidden 4096, batch 4096): one batched-matmul step
              over weights stacked [N, ...] against N separate steps (what a pack runs today).
- cli:        `python -m sae_sweep` on the device: one run, then a packed grid sweep of 4 trials; both
              must exit 0 and the sweep must report that it packed.
Targets (H100-class): dense bf16 >= 60% MFU; TopK >= 10M tokens/s; 32 stacked >= 8x one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_sweep.models import build_sae, model_config

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "4090": 165.0,
}
TOTAL_BUDGET_S = 8 * 60


def sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {
            "mfu": (32, 64, 64),
            "topk": (16, 128, 64, 4),
            "stacked": (16, 32, 64, (2, 3)),
            "steps": 2,
            "cli_tokens": 4096,
        }
    return {
        "mfu": (3072, 16384, 8192),
        "topk": (768, 32768, 16384, 32),
        "stacked": (768, 4096, 4096, (8, 32)),
        "steps": 20,
        "cli_tokens": 1_000_000,
    }


def timed(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int = 2) -> float:
    """Seconds per call after `warmup` calls, the device drained before and after."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def train_step_fn(arch: str, d_in: int, hidden: int, batch: int, device: torch.device, **model: Any):
    """One full training step (forward, backward, clip, Adam, the architecture's hooks) on a fixed batch,
    bf16 autocast on CUDA as the trainer runs it."""
    cfg = model_config(arch, **model)
    sae = build_sae(cfg, d_in, hidden, torch.Generator().manual_seed(0), device).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, d_in, device=device) * 2
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            out = sae(x)
        opt.zero_grad(set_to_none=True)
        (out.mse + out.sparsity + out.aux).backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0, foreach=True)
        opt.step()
        sae.after_optimizer_step(out.fired_H, batch)

    return step


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def dense_mfu(device: torch.device, s: dict[str, Any], peak: float | None) -> list[dict[str, Any]]:
    d_in, hidden, batch = s["mfu"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(batch, d_in, device=device, dtype=dtype)
    b = torch.randn(d_in, hidden, device=device, dtype=dtype)
    gemm_s = timed(lambda: a @ b, device, s["steps"])
    gemm_flops = 2 * batch * d_in * hidden / gemm_s
    step_s = timed(train_step_fn("relu", d_in, hidden, batch, device), device, s["steps"])
    flops = 12 * d_in * hidden * batch / step_s
    row = {
        "bench": "gpu",
        "piece": "dense_mfu",
        "arch": "relu",
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "d_in": d_in,
        "hidden": hidden,
        "batch": batch,
        "tokens_per_s": round(batch / step_s),
        "model_tflop_s": round(flops / 1e12, 2),
        "gemm_tflop_s": round(gemm_flops / 1e12, 2),
        "fraction_of_gemm": round(flops / gemm_flops, 3),
        "peak_tflop_s": peak,
        "mfu": round(flops / (peak * 1e12), 3) if peak else None,
    }
    return [row]


def topk_kernels(device: torch.device, s: dict[str, Any]) -> list[dict[str, Any]]:
    d_in, hidden, batch, k = s["topk"]
    from sae_sweep.models.kernels import kernels_problem

    rows = []
    problem = kernels_problem("triton", device)
    if problem is not None:
        raise SystemExit(
            f"benchmarks.gpu: the topk piece needs the Triton kernels; model.kernels=triton needs {problem}"
        )
    for kernels in ("torch", "triton"):
        step = train_step_fn("topk", d_in, hidden, batch, device, k=k, kernels=kernels)
        step_s = timed(step, device, s["steps"])
        rows.append(
            {
                "bench": "gpu",
                "piece": "topk",
                "kernels": kernels,
                "d_in": d_in,
                "hidden": hidden,
                "batch": batch,
                "k": k,
                "tokens_per_s": round(batch / step_s),
            }
        )
        del step
    rows.append(
        {
            "bench": "gpu",
            "piece": "topk",
            "triton_over_torch": round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3),
        }
    )
    return rows


def stacked(device: torch.device, s: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.sweep_packing import stacked_vs_sequential

    d_in, hidden, batch, counts = s["stacked"]
    rows = []
    for n in counts:
        args = argparse.Namespace(trials=n, d_in=d_in, hidden=hidden, batch=batch, steps=s["steps"])
        pair = stacked_vs_sequential(args, device)
        for row in pair:
            rows.append(
                {"bench": "gpu", "piece": "stacked", **{k: v for k, v in row.items() if k != "bench"}}
            )
        ratio = pair[1]["trial_tokens_per_s"] / pair[0]["trial_tokens_per_s"]
        rows.append(
            {"bench": "gpu", "piece": "stacked", "trials": n, "stacked_over_one_by_one": round(ratio, 3)}
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def cli_smoke(device: torch.device, s: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """The CLI end to end on the device: a single run and a packed 4-trial grid sweep."""
    common = [
        f"device={device.type}",
        f"tokens={s['cli_tokens']}",
        "train.progress=false",
        f"data.path={root / 'data'}",
    ]
    if s["cli_tokens"] < 100_000:  # --tiny: a small data set, so the smoke run takes seconds
        common += [
            "data.d_in=16",
            "data.n_features=32",
            "data.n_tokens=20000",
            "hidden_dim=64",
            "batch_size=256",
        ]
    runs = {
        "single_run": ["model=topk", "model.k=8", f"hydra.run.dir={root / 'run'}", *common],
        "packed_sweep": [
            "-m",
            "model=topk",
            "model.k=4,8,16,32",
            f"hydra.sweep.dir={root / 'sweep'}",
            "sweep.report=false",
            *common,
        ],
    }
    rows = []
    for name, args in runs.items():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sae_sweep", *args], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        out = proc.stdout + proc.stderr
        ok = proc.returncode == 0 and (name == "single_run" or "packed" in out)
        rows.append(
            {
                "bench": "gpu",
                "piece": "cli",
                "what": name,
                "ok": ok,
                "seconds": round(seconds, 1),
                "exit": proc.returncode,
                **({} if ok else {"tail": out[-1500:]}),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        f"`python -m benchmarks.gpu` on {machine['device']} ({machine['date']}, torch {machine['torch']})",
        "",
        "| piece | setting | figure |",
        "| --- | --- | ---: |",
    ]
    for r in rows:
        if r["piece"] == "dense_mfu":
            lines.append(
                f"| dense relu {r['precision']} | {r['d_in']} x {r['hidden']}, batch {r['batch']} | "
                f"{r['model_tflop_s']} TFLOP/s, MFU {r['mfu']}, {r['fraction_of_gemm']} of the GEMM |"
            )
        elif r["piece"] == "topk" and "kernels" in r:
            shape = f"{r['d_in']} x {r['hidden']}, batch {r['batch']}"
            lines.append(
                f"| topk k {r['k']}, kernels={r['kernels']} | {shape} | {r['tokens_per_s']:,} tokens/s |"
            )
        elif r["piece"] == "topk":
            lines.append(f"| topk: triton over torch | | {r['triton_over_torch']}x |")
        elif r["piece"] == "stacked" and "mode" in r:
            lines.append(
                f"| {r['trials']} trials, {r['mode']} | {r['d_in']} x {r['hidden']}, batch {r['batch']} | "
                f"{r['trial_tokens_per_s']:,} trial-tokens/s |"
            )
        elif r["piece"] == "stacked":
            lines.append(
                f"| {r['trials']} trials: stacked over one by one | | {r['stacked_over_one_by_one']}x |"
            )
        elif r["piece"] == "cli":
            lines.append(f"| CLI {r['what']} | | {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s |")
    return "\n".join(lines) + "\n"


PIECES = ("dense_mfu", "topk", "stacked", "cli")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu only with --tiny: a check that every piece runs, not figures",
    )
    p.add_argument("--tiny", action="store_true", help="toy sizes (a smoke run of the script)")
    p.add_argument("--out", default="gpu_results", help="folder for gpu.json and gpu.md")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak, for MFU (default: by device name)",
    )
    p.add_argument("--only", nargs="+", choices=PIECES, default=list(PIECES), help="run these pieces only")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
            "machine, or with --device cpu --tiny to check the script",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and not args.tiny:
        print("benchmarks.gpu: --device cpu runs toy sizes only: add --tiny", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":  # the Triton kernels run interpreted on CPU; set before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    s = sizes(args.tiny)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    peak = peak_tflops(device, args.peak_tflops)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "dense_mfu": lambda: dense_mfu(device, s, peak),
            "topk": lambda: topk_kernels(device, s),
            "stacked": lambda: stacked(device, s),
            "cli": lambda: cli_smoke(device, s, Path(tmp)),
        }
        for piece in args.only:
            for row in runs[piece]():
                print(json.dumps(row), flush=True)
                rows.append(row)
    seconds = time.perf_counter() - start
    result = {"machine": machine, "seconds": round(seconds, 1), "rows": rows}
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "gpu.md").write_text(markdown(rows, machine))
    print(f"wrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'} ({seconds:.0f} s)", flush=True)
    failed = [r for r in rows if r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
