"""A sweep command, parsed and checked: space, settings, objectives, study name, directories, storage.

The driver builds the plan once and checks every trial config it can before any work; each worker
rebuilds the same plan from the same overrides (it is deterministic), so only the overrides travel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf

from sae_sweep.compose import Composer, sweep_settings
from sae_sweep.config import validate_sweep
from sae_sweep.errors import ConfigError
from sae_sweep.recipe import config_note
from sae_sweep.sweep.objectives import Objective, parse_objectives
from sae_sweep.sweep.space import SearchSpace, parse_space
from sae_sweep.sweep.store import StudyStore, resolve_store
from sae_sweep.train.trainer import check_config

RESERVED_DIRS = ("runs", "data")  # outputs/runs and outputs/data belong to single runs and the data cache


@dataclass
class SweepPlan:
    overrides: list[str]
    space: SearchSpace
    settings: Any  # SweepConfig
    sampler: str  # grid | tpe | nsga2 | random
    objectives: list[Objective]
    study_name: str
    sweep_dir: Path
    store: StudyStore
    pruning: bool
    data_kind: str

    @property
    def n_trials(self) -> int | None:
        """The budget of a non-grid search; None for a grid (every point, whatever n_trials says)."""
        return None if self.sampler == "grid" else int(self.settings.n_trials)

    def identity(self) -> dict[str, Any]:
        return _identity(self.space, self.sampler, self.objectives)

    def describe(self) -> str:
        if self.sampler == "grid":
            what = f"grid of {self.space.grid_size()} points"
        else:
            what = f"{self.sampler} search, {self.n_trials} trials"
        dims = "; ".join(f"{d.name}: {d.describe()}" for d in self.space.dims) or "no swept keys"
        objectives = ", ".join(str(o) for o in self.objectives)
        return f"{what} over {dims}; objectives {objectives}"


def difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first key two sweep identities differ in, for messages."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"its {key} was {old.get(key)!r}, now {new.get(key)!r}"
    return "it differs"


def _identity(space: SearchSpace, sampler: str, objectives: list[Objective]) -> dict[str, Any]:
    return {**space.identity(), "sampler": sampler, "objectives": [str(o) for o in objectives]}


def derive_study_name(space: SearchSpace, identity: dict[str, Any]) -> str:
    """Readable and deterministic: the swept keys plus a hash of everything that defines the sweep."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    keys = "-".join(re.sub(r"[^A-Za-z0-9_.]", "", d.name) for d in space.dims) or "sweep"
    return f"{keys[:60]}_{digest}"


def make_plan(overrides: list[str], composer: Composer, check: bool = True) -> SweepPlan:
    """Parse the command's overrides; with `check`, compose and validate trial configs (grid points, or
    each value and both ends of each range) so a bad value stops the sweep before any training."""
    space = parse_space(overrides, composer.group_options)
    points = list(space.probe_points()) if check else [next(space.probe_points())]
    base = None
    data_seen: set[str] = set()
    notes: list[str] = []
    for point in points:
        cfg = composer.compose(space.overrides(point))
        if base is None:
            base = cfg
            validate_sweep(cfg.sweep)
        if check:
            check_config(cfg)
            data_key = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True, default=str)
            if data_key not in data_seen:  # each data set once, before any study or trial exists
                data_seen.add(data_key)
                check_data(cfg.data)
            if (note := config_note(cfg)) and note not in notes:
                notes.append(note)
                print(f"[sweep] note: {note}", flush=True)  # before any training: the grid may be mistaken
    assert base is not None
    settings = sweep_settings(base)
    sampler = settings.sampler
    if sampler == "auto":
        sampler = "grid" if space.is_grid else "tpe"
    if sampler == "grid" and not space.is_grid:
        dim = next(d for d in space.dims if d.kind != "categorical")
        raise ConfigError(
            dim.name,
            dim.describe(),
            "a list or choice(...) with sweep=grid (ranges and intervals need sweep=tpe, nsga2 or random)",
        )
    objectives = parse_objectives(list(settings.objectives), base.data.kind)
    study_name = settings.study_name or derive_study_name(space, _identity(space, sampler, objectives))
    sweep_dir = Path(space.sweep_dir or Path("outputs") / study_name).absolute()
    if space.sweep_dir is None and study_name in RESERVED_DIRS:
        raise ConfigError("sweep.study_name", study_name, f"a name other than {' or '.join(RESERVED_DIRS)}")
    if check:
        check_dir(sweep_dir, "hydra.sweep.dir", readable_only=True)
    store = resolve_store(settings.storage, sweep_dir, settings.heartbeat_s, settings.grace_s)
    if settings.launcher == "slurm" and not store.shareable_across_machines:
        raise ConfigError(
            "sweep.storage",
            settings.storage,
            "a postgresql:// or mysql:// URL, or a journal file "
            "on a disk every node shares (e.g. sweep.storage=/shared/study.journal), with "
            "sweep.launcher=slurm: jobs on other nodes cannot share an SQLite file safely",
        )
    pruning = settings.pruner == "median" or (settings.pruner == "auto" and sampler != "grid")
    return SweepPlan(
        overrides=list(overrides),
        space=space,
        settings=settings,
        sampler=sampler,
        objectives=objectives,
        study_name=study_name,
        sweep_dir=sweep_dir,
        store=store,
        pruning=pruning,
        data_kind=base.data.kind,
    )


def _first_existing(path: Path) -> Path:
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def check_dir(path: Path, key: str, readable_only: bool = False) -> None:
    """`path` is (or can be created as) a directory this process can write in; ConfigError naming the
    file in the way or the read-only folder. `readable_only`: an existing directory need not be writable
    (a finished sweep's table can be shown from a read-only one)."""
    found = _first_existing(path)
    if not found.is_dir():
        where = "is a file" if found == path else f"is under {found}, which is a file"
        raise ConfigError(key, str(path), f"a directory: {path} {where}")
    if found == path and readable_only:
        return
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), f"a directory this user can write in: {found} is read-only")


def check_data(data_cfg: Any) -> None:
    """Open a trial's data once up front (shards: every header, dtype and shape; synthetic: its cache
    folder), so bad data is one line before the study exists rather than a failure in every trial."""
    if data_cfg.kind == "shards":
        from sae_sweep.data import open_dataset

        open_dataset(data_cfg, progress=False)
    elif data_cfg.kind == "synthetic":
        check_dir(Path(data_cfg.path or "outputs/data").absolute(), "data.path")


def check_sweep_dir(sweep_dir: Path) -> None:
    """The sweep directory's trials/ and trials/N are folders (a file there would fail every trial)."""
    trials = sweep_dir / "trials"
    if trials.exists() and not trials.is_dir():
        raise ConfigError(
            "hydra.sweep.dir", str(sweep_dir), f"a sweep directory: {trials} is a file, not a folder"
        )
    if trials.is_dir():
        for child in sorted(trials.iterdir()):
            if child.name.isdigit() and not child.is_dir():
                raise ConfigError(
                    "hydra.sweep.dir",
                    str(sweep_dir),
                    f"a sweep directory: {child} is a file where a trial folder goes; move it away",
                )


def make_sampler(plan: SweepPlan, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler a worker fills budget slots with. Grid points arrive with their parameters fixed, so a
    grid never consults its sampler (Optuna's GridSampler is not used: it can hand the same point to two
    concurrent workers and calls study.stop(), which only works inside study.optimize)."""
    seed = None if plan.settings.seed is None else int(plan.settings.seed) + worker_index
    if plan.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if plan.sampler in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials running elsewhere count as bad guesses, so concurrent workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
