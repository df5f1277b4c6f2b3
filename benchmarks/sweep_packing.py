"""Sweep throughput: the same grid of small trials run one by one (sweep.pack=1) and packed (the default),
end to end through the sweep driver; plus stacked weights (one bmm step for all trials) against the
per-trial steps a pack runs, measured in the same process.

    python -m benchmarks.sweep_packing                          # 8 relu trials, d_in 128, hidden 1024
    python -m benchmarks.sweep_packing --d-in 768 --hidden 4096 --tokens 400000 --device cuda

Prints JSON lines: trial-tokens per second (the trials' training tokens summed, over the sweep's wall
time, set-up and evaluation included) for each mode, the packed/one-by-one ratio, and the stacked-step
comparison. The data is a folder of random shards written to a temporary directory first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_sweep.models import build_sae, model_config
from sae_sweep.sweep import driver


def write_shards(folder: Path, tokens: int, d_in: int, seed: int = 0) -> None:
    """Random activations with a mean offset and a few dominant directions (an SAE has work to do)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, d_in)).astype(np.float32)
    per_shard = 200_000
    for i, start in enumerate(range(0, tokens, per_shard)):
        n = min(per_shard, tokens - start)
        codes = rng.exponential(1.0, (n, 64)).astype(np.float32) * (rng.random((n, 64)) < 0.1)
        x = codes @ basis + 0.1 * rng.standard_normal((n, d_in)).astype(np.float32) + 1.0
        np.save(folder / f"shard_{i:03d}.npy", x)


def run_sweep(sweep_dir: Path, data: Path, args: argparse.Namespace, pack: int | None) -> float:
    """Wall seconds of one grid sweep of `args.trials` trials."""
    values = ",".join(f"{v:g}" for v in np.geomspace(0.5, 8, args.trials))
    space = (
        f"model.k={','.join(str(4 * (i + 1)) for i in range(args.trials))}"
        if args.arch == "topk"
        else (f"l1_lambda={values}")
    )
    command = [
        space,
        f"model={args.arch}",
        "data=shards",
        f"data.path={data}",
        f"hidden_dim={args.hidden}",
        f"batch_size={args.batch}",
        f"tokens={args.tokens}",
        f"device={args.device}",
        "train.progress=false",
        f"hydra.sweep.dir={sweep_dir}",
        "sweep.report=false",
    ]
    if pack is not None:
        command.append(f"sweep.pack={pack}")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = driver.run(command)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"sweep failed ({status}):\n{out.getvalue()[-2000:]}")
    if pack is None and "packed" not in out.getvalue():
        raise SystemExit("the default sweep did not pack its trials:\n" + out.getvalue()[-2000:])
    return seconds


def stacked_vs_sequential(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Seconds per batch for n relu SAEs: n separate steps (what a pack runs) vs one batched-matmul step
    over weights stacked [n, ...] (what a stacked pack would run), forward + backward + Adam."""
    n, d, h, b = args.trials, args.d_in, args.hidden, args.batch
    x = torch.randn(b, d, device=device)
    saes = [
        build_sae(model_config("relu"), d, h, torch.Generator().manual_seed(i)).to(device) for i in range(n)
    ]
    opts = [torch.optim.Adam(s.parameters(), lr=1e-4) for s in saes]

    def sequential() -> None:
        for sae, opt in zip(saes, opts, strict=True):
            out = sae(x)
            opt.zero_grad(set_to_none=True)
            (out.mse + out.sparsity).backward()
            opt.step()

    W_enc = torch.randn(n, d, h, device=device, requires_grad=True)
    W_dec = torch.randn(n, h, d, device=device, requires_grad=True)
    b_enc = torch.zeros(n, 1, h, device=device, requires_grad=True)
    b_dec = torch.zeros(n, 1, d, device=device, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    lam = torch.linspace(0.5, 8, n, device=device).view(n, 1, 1)

    def stacked() -> None:
        xs = x.expand(n, b, d)
        f = torch.relu(torch.baddbmm(b_enc, xs - b_dec, W_enc))
        x_hat = torch.baddbmm(b_dec, f, W_dec)
        mse = (x_hat - xs).pow(2).sum(-1).mean()
        l1 = (lam * f * W_dec.norm(dim=-1).unsqueeze(1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        (mse + l1).backward()
        opt.step()

    rows = []
    for name, fn in (("sequential_steps", sequential), ("stacked_bmm", stacked)):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        rows.append(
            {
                "bench": "pack_step",
                "mode": name,
                "trials": n,
                "d_in": d,
                "hidden": h,
                "batch": b,
                "trial_tokens_per_s": round(n * b / seconds),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--arch", default="relu", choices=["relu", "topk"])
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per trial")
    p.add_argument("--steps", type=int, default=5, help="timed steps of the stacked comparison")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    device = torch.device(args.device)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        write_shards(data, max(args.tokens, 4 * args.batch) * 11 // 10, args.d_in)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            results = {}
            for mode, pack in (("one_by_one", 1), ("packed", None)):
                seconds = run_sweep(root / mode, data, args, pack)
                trial_tokens = args.trials * args.tokens
                results[mode] = trial_tokens / seconds
                print(
                    json.dumps(
                        {
                            "bench": "sweep",
                            "mode": mode,
                            "arch": args.arch,
                            "trials": args.trials,
                            "d_in": args.d_in,
                            "hidden": args.hidden,
                            "batch": args.batch,
                            "tokens_per_trial": args.tokens,
                            "seconds": round(seconds, 1),
                            "trial_tokens_per_s": round(results[mode]),
                            **machine,
                        }
                    ),
                    flush=True,
                )
        finally:
            os.chdir(cwd)
    print(
        json.dumps(
            {"bench": "sweep", "packed_over_one_by_one": round(results["packed"] / results["one_by_one"], 3)}
        )
    )
    rows = stacked_vs_sequential(args, device)
    for row in rows:
        print(json.dumps(row), flush=True)
    ratio = rows[1]["trial_tokens_per_s"] / rows[0]["trial_tokens_per_s"]
    print(json.dumps({"bench": "pack_step", "stacked_over_sequential": round(ratio, 3)}))


if __name__ == "__main__":
    main()
