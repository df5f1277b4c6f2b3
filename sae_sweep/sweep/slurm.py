"""`sweep.launcher=slurm`: submit `sweep.workers` jobs (submitit), each running the worker loop against the
sweep's shared storage. A job killed by its time limit leaves its trial to be resumed by another worker
or by the next run of the command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sae_sweep.errors import ConfigError
from sae_sweep.sweep import optuna_adapter as oa
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


def submit_workers(plan: SweepPlan, n: int | None = None) -> list[Any]:
    """Submit `n` worker jobs (default `sweep.workers`); returns submitit Job objects."""
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
    n = int(plan.settings.workers) if n is None else n
    specs = [WorkerSpec(plan.overrides, os.getcwd(), i, 1) for i in range(n)]
    try:
        with executor.batch():
            jobs = [executor.submit(run_worker, spec) for spec in specs]
    except Exception as err:  # e.g. sbatch missing or refusing the job
        raise ConfigError(
            "sweep.launcher", "slurm", f"a cluster that accepts the jobs (submitit: {err})"
        ) from None
    return jobs


# --- the jobs of a sweep, across commands ---------------------------------------------------------------
JOB_PREFIX = "sae_sweep:job:"  # study system attr per submitted job: its id, folder, cluster, verdict
LIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def record_jobs(study: Any, jobs: list[Any], folder: Path, cluster: str) -> None:
    for job in jobs:
        entry = {"job_id": str(job.job_id), "folder": str(folder), "cluster": cluster, "reported": False}
        oa.set_study_system_attr(study, JOB_PREFIX + str(job.job_id), entry)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def job_verdict(entry: dict[str, Any], live_jobs: set[str]) -> tuple[str, str]:
    """("live" | "done" | "failed", error) of a recorded job, from its result file, the roster (a worker
    it runs has registered) or the cluster (a SLURM job still queued; a local job's process)."""
    from submitit.core.utils import JobPaths, pickle_load

    paths = JobPaths(entry["folder"], job_id=entry["job_id"], task_id=0)
    if paths.result_pickle.exists():
        try:
            kind, value = pickle_load(paths.result_pickle)
        except Exception as err:  # being written, or damaged
            return "failed", f"unreadable result file {paths.result_pickle} ({err})"
        return ("done", "") if kind == "success" else ("failed", _last_line(value))
    if entry["job_id"] in live_jobs:
        return "live", ""
    if entry["cluster"] == "local":  # the job id is the process id
        try:
            os.kill(int(entry["job_id"]), 0)
            return "live", ""
        except (ProcessLookupError, ValueError):
            return "failed", f"ended without a result (killed?); see {paths.stderr}"
        except PermissionError:
            return "live", ""
    import submitit

    state = str(submitit.SlurmJob(entry["folder"], entry["job_id"]).state).upper()
    if any(state.startswith(s) for s in LIVE_SLURM_STATES):
        return "live", ""
    return "failed", f"ended {state} without a result; see {paths.stderr}"


def job_states(study: Any, grace_s: float) -> tuple[list[str], list[tuple[str, str]]]:
    """(ids of the sweep's live jobs, (id, error) of jobs that failed and were not reported before)."""
    from sae_sweep.sweep.roster import live_workers

    live_jobs = {str(w["job"]) for w in live_workers(study, grace_s) if w.get("job")}
    live, failed = [], []
    for key, entry in oa.study_system_attrs(study).items():
        if not key.startswith(JOB_PREFIX) or entry.get("verdict") in ("done", "failed"):
            continue
        verdict, error = job_verdict(entry, live_jobs)
        if verdict == "live":
            live.append(entry["job_id"])
            continue
        oa.set_study_system_attr(study, key, {**entry, "verdict": verdict, "error": error})
        if verdict == "failed":
            failed.append((entry["job_id"], error))
    return live, failed
