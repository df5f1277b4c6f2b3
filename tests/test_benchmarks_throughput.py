"""`python -m benchmarks.train_throughput` runs end to end at toy sizes (its figures come from full sizes)."""

import json
import subprocess
import sys


def test_train_throughput_runs_every_piece_including_the_training_loop():
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--d-in", "32", "--hidden", "128"]
    cmd += ["--batch", "128", "--k", "8", "--steps", "1", "--loop-steps", "4"]
    cmd += ["--arch", "relu", "topk", "batchtopk"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["bench"] for r in rows} == {"gemm", "bound", "train_step", "batchtopk_over_topk", "in_loop"}
    in_loop = {r["arch"]: r["tokens_per_s"] for r in rows if r["bench"] == "in_loop"}
    assert set(in_loop) == {"topk", "batchtopk"} and all(v > 0 for v in in_loop.values())
    steady = [r["steady_tokens_per_s"] for r in rows if r["bench"] == "in_loop"]
    assert all(v is not None and v > 0 for v in steady)  # steps 3-4, after the first logged row
    steps = {(r["arch"], r["path"]) for r in rows if r["bench"] == "train_step"}
    assert {("relu", "dense"), ("topk", "sparse"), ("batchtopk", "sparse")} <= steps
