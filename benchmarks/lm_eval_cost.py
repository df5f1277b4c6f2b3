"""What `eval.lm` costs per trial: the model load and baselines once, then one spliced pass per SAE.

    python -m benchmarks.lm_eval_cost RUN_DIR [RUN_DIR ...]   # e.g. outputs/smollm2-l15-topk/trials/*
    python -m benchmarks.lm_eval_cost RUN_DIR ... tokens=8192 device=cpu   # eval.lm.* keys, as lm_eval takes

Scores each run as a sweep worker does, in one process: the first call loads the LM and computes the
clean and zero-ablation losses (paid once per worker), every call then runs the SAE-spliced forward
from the hooked block. Prints one JSON line per run (seconds, tokens, ce_loss_score) and a summary
line: first-call seconds and the mean seconds of the calls after it, the per-trial cost in a sweep.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sae_sweep import rundir
from sae_sweep.config import LMEvalConfig
from sae_sweep.lm_eval import lm_eval_metrics
from sae_sweep.models import load_sae


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="run directories trained on a harvest's shards, then eval.lm keys")
    args = p.parse_args(argv).args
    overrides = [a for a in args if "=" in a]
    lm_cfg = OmegaConf.merge(OmegaConf.structured(LMEvalConfig), OmegaConf.from_dotlist(overrides))
    seconds: list[float] = []
    for run_dir in [Path(a) for a in args if "=" not in a]:
        harvest_dir = (rundir.read_config(run_dir) or {}).get("data", {}).get("path")
        sae = load_sae(run_dir)
        start = time.perf_counter()
        metrics = lm_eval_metrics(sae, lm_cfg, harvest_dir)
        seconds.append(time.perf_counter() - start)
        row = {"bench": "lm_eval", "run": str(run_dir), "seconds": round(seconds[-1], 2)}
        row |= {"tokens": metrics["lm_eval_tokens"], "ce_loss_score": round(metrics["ce_loss_score"], 4)}
        print(json.dumps(row), flush=True)
    later = seconds[1:]
    summary = {
        "bench": "lm_eval_cost",
        "first_call_s": round(seconds[0], 2),
        "threads": torch.get_num_threads(),
    }
    summary["per_trial_s"] = round(sum(later) / len(later), 2) if later else None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
