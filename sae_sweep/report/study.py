"""Reading a sweep's Optuna study: where its storage is, which study, its trials and objectives.

Storage files are opened read-only (SQLite in `mode=ro`), so a report never writes to or locks the
storage of a sweep that is still running.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_sweep.sweep.queue import IDENTITY_ATTR  # where a study records its objectives

RDB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
JOURNAL_SUFFIXES = (".journal", ".log")


def find_storage(sweep_dir: Path) -> Path | None:
    """The study storage file in a sweep directory (SQLite, or an Optuna journal file), if any."""
    preferred = sweep_dir / "study.db"
    if preferred.is_file():
        return preferred
    files = sorted(p for p in sweep_dir.iterdir() if p.is_file())
    for suffix in (*RDB_SUFFIXES, *JOURNAL_SUFFIXES):  # a stray .log file last
        for path in files:
            if path.suffix == suffix:
                return path
    return None


def open_storage(spec: str | Path) -> Any:
    """An Optuna storage from a file path (SQLite, journal) or a database URL; SQLite files read-only,
    so a report never writes to (or locks) a live sweep's storage."""
    import optuna

    text = str(spec)
    if "://" in text and not text.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(text, skip_compatibility_check=True, skip_table_creation=True)
    path = Path(text.removeprefix("sqlite:///"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such study storage")
    if path.suffix in JOURNAL_SUFFIXES:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    return optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)


def _pick_study(names: list[str], wanted: Sequence[str | None], where: str) -> str | None:
    if len(names) <= 1:
        return names[0] if names else None
    for name in wanted:
        if name in names:
            return name
    raise ValueError(f"{where} holds studies {names}: name one (--study NAME / study_name=...)")


def load_trials(
    sweep_dir: Path,
    study_name: str | None = None,
    storage: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[str | None, list[Any], list[tuple[str, str]]]:
    """(study name, frozen trials, objectives as (metric, direction)) of the sweep's study; (None, [], [])
    when there is none to read.

    The storage is `storage` if given, else a storage file in the sweep directory, else the
    `sweep.storage` a trial's config recorded (a shared journal file or a database server). The study
    is `study_name`, else the only one, else the config's `sweep.study_name`, else the directory's name.
    A storage found (not given) that cannot be read is skipped with a warning: the trial directories
    still make a report.
    """
    import optuna

    config = config or {}
    spec = storage or find_storage(sweep_dir) or config.get("sweep.storage")
    if not spec:
        return None, [], []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        opened = open_storage(spec)
        names = optuna.study.get_all_study_names(opened)
    except Exception as err:  # noqa: BLE001 - any storage failure: fall back to the directories
        if storage:
            raise
        warnings.warn(
            f"cannot read the study storage {spec} ({err}); using the trial directories only", stacklevel=2
        )
        return None, [], []
    name = study_name or _pick_study(names, [config.get("sweep.study_name"), sweep_dir.name], str(spec))
    if name is None:
        return None, [], []
    study = optuna.load_study(study_name=name, storage=opened)
    identity = study.user_attrs.get(IDENTITY_ATTR) or {}
    pairs = [str(o).split(":", 1) for o in identity.get("objectives", [])]
    objectives = [(m, d) for m, d in (p for p in pairs if len(p) == 2)]
    return name, study.get_trials(deepcopy=False), objectives


def study_columns(trial: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"state": trial.state.name}
    if trial.datetime_start is not None:
        row["datetime_start"] = trial.datetime_start.isoformat(timespec="seconds")
    if trial.duration is not None:
        row["duration_s"] = trial.duration.total_seconds()
    return row


def trial_run_dir(sweep_dir: Path, number: int, trial: Any) -> Path | None:
    """trials/<number>, else the run_dir the trial recorded (absolute, or relative to the sweep)."""
    default = sweep_dir / "trials" / str(number)
    if default.is_dir():
        return default
    recorded = trial.user_attrs.get("run_dir") if trial is not None else None
    if recorded:
        for candidate in (Path(recorded), sweep_dir / recorded):
            if candidate.is_dir():
                return candidate
    return None
