"""`sweep.launcher=slurm`: submit `sweep.workers` jobs (submitit), each running the worker loop against the
sweep's shared storage. A job killed by its time limit leaves its trial to be resumed by another worker
or by the next run of the command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sae_sweep.errors import ConfigError
from sae_sweep.sweep.plan import SweepPlan
from sae_sweep.sweep.worker import WorkerSpec, run_worker


def job_parameters(plan: SweepPlan) -> dict[str, Any]:
    """submitit AutoExecutor parameters from `sweep.slurm.*` (slurm_* ones are ignored by other clusters)."""
    s = plan.settings.slurm
    params: dict[str, Any] = {
        "name": f"sae_sweep-{plan.study_name}",
        "timeout_min": int(s.time_min),
        "cpus_per_task": int(s.cpus_per_task),
        "mem_gb": int(s.mem_gb),
        "nodes": 1,
        "tasks_per_node": 1,
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = int(s.gpus_per_node)
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.additional_parameters:
        params["slurm_additional_parameters"] = dict(s.additional_parameters)
    return params


def submit_workers(plan: SweepPlan) -> list[Any]:
    """Submit the worker jobs; returns submitit Job objects."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "sweep.launcher", "slurm", "local, or install submitit: pip install 'sae_sweep[slurm]'"
        ) from None
    s = plan.settings.slurm
    folder = Path(s.log_dir or plan.sweep_dir / "slurm").absolute()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=s.cluster)
    executor.update_parameters(**job_parameters(plan))
    n = int(plan.settings.workers)
    specs = [WorkerSpec(plan.overrides, os.getcwd(), i, 1) for i in range(n)]
    try:
        with executor.batch():
            jobs = [executor.submit(run_worker, spec) for spec in specs]
    except Exception as err:  # e.g. sbatch missing or refusing the job
        raise ConfigError(
            "sweep.launcher", "slurm", f"a cluster that accepts the jobs (submitit: {err})"
        ) from None
    return jobs
