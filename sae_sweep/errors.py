"""Errors a user can fix: each carries one line that names the key or file, the value and what is allowed."""


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
