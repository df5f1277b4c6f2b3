"""sae_sweep: find good sparse autoencoders by sweeping their hyperparameters.

From Python, the same runs the command line makes:

    import sae_sweep
    cfg = sae_sweep.compose_config(["model=topk", "model.k=32", "tokens=2000000"])  # as on the CLI
    metrics = sae_sweep.train(cfg)                      # the run directory's metrics.json
    sae = sae_sweep.load_sae(cfg.out_dir)               # applies to raw activations
    df = sae_sweep.collect("outputs/sweeps/my_study")   # a sweep's trials, one row each
    sae_sweep.write_report("outputs/sweeps/my_study")   # its report/ (tables, figures, index.html)

`train_pack` trains several configs on one pass over shared batches; `evaluate_sae` scores any SAE on
any dataset's held-out split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sae_sweep._version import __version__
from sae_sweep.compose import compose_config
from sae_sweep.config import Config
from sae_sweep.errors import ConfigError, DataError, PackInterrupted, RunStopped, SaeSweepError
from sae_sweep.models import SAE, load_sae
from sae_sweep.rundir import Metrics
from sae_sweep.train import Evaluation, evaluate_sae, train, train_pack

if TYPE_CHECKING:
    from sae_sweep.report import collect, write_report

__all__ = [
    "SAE",
    "Config",
    "ConfigError",
    "DataError",
    "Evaluation",
    "Metrics",
    "PackInterrupted",
    "RunStopped",
    "SaeSweepError",
    "__version__",
    "collect",
    "compose_config",
    "evaluate_sae",
    "load_sae",
    "train",
    "train_pack",
    "write_report",
]


def __getattr__(name: str) -> Any:
    # The report (pandas, matplotlib) loads on first use: the command line and training never need it.
    if name in ("collect", "write_report"):
        from sae_sweep import report

        return getattr(report, name)
    raise AttributeError(f"module 'sae_sweep' has no attribute {name!r}")
