"""Validation helpers every config schema shares (run, sweep, harvest, LM evaluation): a leaf module.

Each check raises ConfigError with one line naming the key, the value and what is allowed. `field_docs`
reads a dataclass's field comments, which are the documentation of its keys (`--help` lists them).
"""

from __future__ import annotations

import inspect
import io
import math
import re
import textwrap
import tokenize

import torch

from sae_sweep.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))


def positive(key: str, value: float | int | None, *, allow_none: bool = False) -> None:
    """A positive finite number (or None where allow_none)."""
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, value, "a positive finite number")


def fraction(key: str, value: float, *, upper_open: bool = True) -> None:
    """In [0, 1) (or [0, 1] with upper_open=False)."""
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ConfigError(key, value, "a fraction in [0, 1)" if upper_open else "a fraction in [0, 1]")


def check_device(value: str, key: str = "device") -> None:
    """auto | cpu | cuda, and cuda only where a CUDA device is present."""
    one_of(key, value, DEVICES)
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, "cuda", "auto or cpu: no CUDA device is available here")


def resolve_device(name: str) -> torch.device:
    """The device a checked `device` value names: auto = cuda where present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: its trailing comment, or the comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number -> comment text (tokenize: a '#' inside a string is not one)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    docs: dict[str, str] = {}
    pending: list[str] = []
    for number, line in enumerate(source.splitlines()[1:], start=2):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(comments.get(number, ""))
            continue
        match = re.match(r"(\w+): ", stripped)
        if match:
            docs[match.group(1)] = " ".join([*pending, comments.get(number, "")]).strip()
        pending = []
    return docs
