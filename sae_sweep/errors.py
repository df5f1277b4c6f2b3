"""Every exception the package raises on purpose.

SaeSweepError and its subclasses are errors a user can fix: each carries one line that names the key or
file, the value and what is allowed. RunStopped is a run that ended early (diverged, collapsed, pruned)
and PackInterrupted a Ctrl-C / SIGTERM that left checkpoints to resume from; Released is a pack member
let go (checkpointed) so that another worker resumes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type only: rundir imports this module
    from sae_sweep.rundir import Metrics


class SaeSweepError(Exception):
    """Base class: the CLI prints these as one line (no traceback) and exits with status 2."""


class ConfigError(SaeSweepError):
    """A config key has a value that is not allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {value!r} is not allowed: {allowed}")


class DataError(SaeSweepError):
    """A data file or folder cannot be used (unreadable, wrong shape, mixed d_in, NaN/inf, empty)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"data file '{path}': {problem}")


class RunStopped(SaeSweepError):
    """The run ended before its budget; metrics.json records `status` and `reason`, and no SAE is written.

    Raised by the trainer (diverged, collapsed) or by an `on_log` callback (a sweep's pruner: pruned).
    """

    def __init__(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(f"{status}: {reason}")


class TrainingDiverged(RunStopped):
    """The loss became NaN/inf."""

    def __init__(self, reason: str) -> None:
        super().__init__("diverged", reason)


class TrainingCollapsed(RunStopped):
    """Every latent went silent after the sparsity warm-up: nothing left to train."""

    def __init__(self, reason: str) -> None:
        super().__init__("collapsed", reason)


class PackInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during train_pack: `outcomes` holds the members that had ended by then (by index
    in the configs: metrics, or the exception that stopped them); every other member wrote its checkpoint
    and resumes from it."""

    def __init__(self, outcomes: Mapping[int, Metrics | BaseException]) -> None:
        super().__init__()
        self.outcomes = outcomes


class Released(Exception):
    """A pack member let go at a window boundary (train_pack's `release` hook): its checkpoint is written
    and it resumes from it wherever it runs next. Not a failure, and nothing is recorded for it."""
