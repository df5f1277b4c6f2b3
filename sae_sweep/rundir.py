"""The run directory: its file names, the one durable atomic writer, reading metrics, the same-run check.

A run directory (`out_dir`; a sweep's `trials/N`) holds:

    config.yaml        the resolved config, written when the run starts
    checkpoint.pt      model, optimizer and loop state while the run is unfinished (removed at the end)
    curves.csv         one row of training-batch means every train.log_every_tokens
    metrics.json       held-out metrics and run facts of a finished run, or `status`/`reason` of a stopped one
    sae.safetensors    the trained SAE in the plain form that applies to raw activations
    density.json       per-latent firing density (and ground-truth scores on synthetic data)

Every file here (and the report's, harvest's and interop's) is written by `atomic_write`: the bytes go to
a temporary file in the same directory, named uniquely per process so that two processes writing one
file never share a temp file, which is flushed and fsynced, renamed over the target and the directory
fsynced. A reader sees the old file or the new one, never a torn one, even after a crash or power cut.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypedDict

from omegaconf import OmegaConf

from sae_sweep.errors import ConfigError

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
CURVES = "curves.csv"
METRICS = "metrics.json"
SAE = "sae.safetensors"
DENSITY = "density.json"

TEMP_SUFFIX = ".tmp"
# Free bytes under which a failed write is reported as a full disk (a checkpoint is tens of MB or more).
DISK_NEARLY_FULL = 64 * 2**20


class _MetricsIfMeasured(TypedDict, total=False):
    reason: str  # why a run that trained to the end is no result (status collapsed: held-out fvu >= 1)
    mcc: float  # synthetic data: mean |cos| of true features and their matched latents
    f1: float  # synthetic data: mean F1 of matched latents as detectors of their features
    # eval.lm enabled: a causal LM with the SAE spliced in
    ce_loss_score: float
    delta_lm_loss: float
    ce_loss_clean: float
    ce_loss_sae: float
    ce_loss_zero_ablation: float
    lm_eval_tokens: int


class Metrics(_MetricsIfMeasured):
    """metrics.json of a completed run: what `train` returns (a run that stops early raises RunStopped;
    its metrics.json then holds `status`, `reason` and its last curves.csv row instead)."""

    status: str  # completed (collapsed in a pack's outcome when held-out fvu >= 1; train raises then)
    # held-out evaluation (evaluate_sae), in the run's scaled units
    mse: float
    fvu: float  # fraction of variance unexplained = 1 - explained_variance
    explained_variance: float
    l0: float  # mean latents firing per token
    l1: float
    cos_sim: float
    l2_ratio: float
    pct_active_batch: float
    dense_frac: float  # share of latents firing on more than 10% of tokens
    n_eval_tokens: int
    loss: float  # mse + l1_lambda * sparsity at the final coefficient
    # run facts
    dead_frac: float
    alive_frac: float
    dead_window_tokens: int
    tokens: int  # tokens trained on
    steps: int
    tokens_per_s: float
    train_seconds: float
    resumed_from_tokens: int
    architecture: str
    d_in: int
    hidden_dim: int
    l1_lambda: float | None  # the coefficient used (None for architectures without one)
    k: int | None
    lr: float
    batch_size: int
    scale_factor: float
    raw_mean_norm: float


# Settings that may change between the interrupted and the resuming command.
# model.kernels: torch and Triton compute the same steps, so a run may resume under the other
RESUME_IGNORED_KEYS = (
    "out_dir",
    "device",
    "model.kernels",
    "train.progress",
    "train.checkpoint_every_s",
    "train.stack",  # how a pack steps its members, not what they train
)


# --- the one writer ----------------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """A temporary sibling of `path` no other process or call uses (`<name>.<pid>-<random>.tmp`)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; elsewhere the rename is all there is)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Replace `path` with what `write(fh)` writes to a binary file handle, atomically and durably.

    If `write` raises (or the process dies) the old file stays as it was and the temp file is removed
    (a kill leaves it behind as `<name>.<pid>-<random>.tmp`, which no reader looks at).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except RuntimeError as err:  # torch's zip writer reports a failed write (e.g. a full disk) this way
        failure = write_failure(path, err)
        tmp.unlink(missing_ok=True)
        raise failure from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_failure(path: Path, err: BaseException) -> OSError:
    """An OSError naming `path` for a writer's non-OSError failure, ENOSPC when its disk is (nearly)
    full: so the CLI reports it in one line, as it does any other file it cannot write."""
    text = str(err).strip()
    detail = text.splitlines()[0] if text else type(err).__name__
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < DISK_NEARLY_FULL:
        problem = f"No space left on device ({free // 2**20} MiB free; {detail})"
        return OSError(errno.ENOSPC, problem, str(path))
    return OSError(errno.EIO, f"could not be written ({detail})", str(path))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    """Indented JSON; NaN and inf are written as the bare words Python's json reads back."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """Rows of one shape with a header from the first row's keys; nothing is written for no rows."""
    if not rows:
        return None
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def write_torch(path: str | Path, obj: Any) -> Path:
    """torch.save, atomically (checkpoints)."""
    import torch  # only checkpoint writers need it; the report reads run directories without torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def write_config(path: str | Path, cfg: Any) -> Path:
    """An OmegaConf config (or plain dict) as resolved YAML."""
    return write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


# --- reading -----------------------------------------------------------------------------------------
def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent or not readable JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json of a run directory (Metrics when its status is completed), or None while there is
    none (running, never started, unreadable)."""
    return read_json(Path(run_dir) / METRICS)


def read_config(run_dir: str | Path) -> dict[str, Any] | None:
    """config.yaml of a run directory as a plain dict (resolved), or None if it has none."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


# --- the same-run check ------------------------------------------------------------------------------
def comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The config minus keys that may differ when resuming (RESUME_IGNORED_KEYS)."""
    out = json.loads(json.dumps(cfg_dict))
    for dotted in RESUME_IGNORED_KEYS:
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out


def run_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None if two configs are the same run, else their first difference ("lr was 0.001, now 0.01")."""
    a, b = _shared_model_keys(comparable(saved), comparable(current))
    return None if a == b else _first_difference(a, b)


def _shared_model_keys(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both configs with only the `model` keys they share, when they name the same architecture.

    `model.*` is the architecture's own schema, so a key only one side has is one that architecture
    does not read: e.g. a config.yaml written when every architecture's keys sat in one model schema.
    """
    ma, mb = a.get("model"), b.get("model")
    if isinstance(ma, dict) and isinstance(mb, dict) and ma.get("name") == mb.get("name"):
        shared = ma.keys() & mb.keys()
        a = {**a, "model": {k: v for k, v in ma.items() if k in shared}}
        b = {**b, "model": {k: v for k, v in mb.items() if k in shared}}
    return a, b


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} was {a!r}, now {b!r}"


def check_same_run(run_dir: Path, cfg_dict: dict[str, Any]) -> None:
    """Raise ConfigError if run_dir's config.yaml holds a different run than cfg_dict."""
    saved = read_config(run_dir)
    diff = run_difference(saved, cfg_dict) if saved is not None else None
    if diff is not None:
        raise ConfigError(
            "hydra.run.dir",
            str(run_dir),
            f"a directory without a different run in it: it holds a run whose {diff} — use another run "
            "directory, or delete that one to start over",
        )


def shown_path(path: Path | str) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
