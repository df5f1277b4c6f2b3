"""A sweep directory's trials/ belongs to one study.

`study.json` in the sweep directory names the study whose trials are in trials/. A command whose study
is another one (a changed search space gives another derived name) is refused before it touches a trial
directory, so two studies never mix in one directory. A study created afresh over existing trial
directories (its storage was deleted or lost) reuses them: every finished or checkpointed run whose
config is one of the new trials' is moved to that trial's number, and train() then returns its metrics
(or resumes it) instead of training again; runs that match no trial are set aside in trials-set-aside/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from sae_sweep import rundir
from sae_sweep.compose import Composer, trial_config
from sae_sweep.errors import ConfigError
from sae_sweep.sweep.plan import SweepPlan, difference
from sae_sweep.sweep.queue import IDENTITY_ATTR, known_params

MARKER = "study.json"
SET_ASIDE = "trials-set-aside"


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    trials = sweep_dir / "trials"
    if not trials.is_dir():
        return []
    return sorted((p for p in trials.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name))


def read_marker(sweep_dir: Path) -> dict[str, Any] | None:
    return rundir.read_json(sweep_dir / MARKER)


def write_marker(plan: SweepPlan) -> None:
    marker = {"study_name": plan.study_name, "storage": plan.store.url}
    if read_marker(plan.sweep_dir) != marker:
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(plan.sweep_dir / MARKER, marker)


def check_owner(plan: SweepPlan, raw: BaseStorage, identity: dict[str, Any]) -> None:
    """ConfigError if the sweep directory holds another study's trials (see the module docstring)."""
    marker = read_marker(plan.sweep_dir)
    other = marker.get("study_name") if marker else None
    if other is None and plan.store.kind == "sqlite" and _trial_dirs(plan.sweep_dir):
        # a directory from before study.json: its own SQLite file says whose trials they are
        names = [n for n in optuna.study.get_all_study_names(raw) if n != plan.study_name]
        other = names[0] if names and plan.study_name not in optuna.study.get_all_study_names(raw) else None
    if other is None or other == plan.study_name:
        return
    what = "a different sweep"
    try:
        stored = optuna.load_study(study_name=other, storage=raw).user_attrs.get(IDENTITY_ATTR)
        if stored is not None:
            what = f"a different sweep ({difference(stored, identity)})"
    except KeyError:  # that study is in another storage
        pass
    raise ConfigError(
        "hydra.sweep.dir",
        str(plan.sweep_dir),
        f"a directory of its own for study '{plan.study_name}': it holds the trials of study '{other}', "
        f"{what}; pass another hydra.sweep.dir, or delete that directory to start over",
    )


def _key(cfg_dict: dict[str, Any]) -> str:
    return json.dumps(rundir.comparable(cfg_dict), sort_keys=True, default=str)


def adopt_runs(plan: SweepPlan, composer: Composer, study: optuna.Study) -> tuple[int, int]:
    """A study created over existing trial directories: move each run to the new trial with its config;
    returns (runs reused, runs set aside). Call under the study's fill lock, before any worker starts."""
    dirs = _trial_dirs(plan.sweep_dir)
    if not dirs:
        return 0, 0
    from omegaconf import OmegaConf

    old: dict[str, Path] = {}
    for d in dirs:
        saved = rundir.read_config(d)
        if saved is not None:
            old.setdefault(_key(saved), d)
    trials_dir = plan.sweep_dir / "trials"
    moves: dict[Path, Path] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        params = known_params(t)
        if params is None:  # a search's slot: its parameters are not chosen yet, no run can be its
            continue
        target = trials_dir / str(t.number)
        cfg = trial_config(composer.compose(plan.space.overrides(params)), target)
        found = old.pop(_key(OmegaConf.to_container(cfg, resolve=True)), None)  # type: ignore[arg-type]
        if found is not None:
            moves[found] = target
    staged = {d: trials_dir / f".rebuild-{d.name}" for d in dirs}
    for d, tmp in staged.items():  # out of the way first: a run may move to a number another run holds
        d.rename(tmp)
    for d, target in moves.items():
        staged.pop(d).rename(target)
    if staged:
        aside = plan.sweep_dir / SET_ASIDE
        aside.mkdir(exist_ok=True)
        for d, tmp in staged.items():
            dest, n = aside / d.name, 0
            while dest.exists():
                n += 1
                dest = aside / f"{d.name}.{n}"
            tmp.rename(dest)
    return len(moves), len(staged)
