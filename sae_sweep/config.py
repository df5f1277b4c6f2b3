"""Structured configs: the field comments are the documentation of every key (`--help` lists them).

Hydra composes `conf/config.yaml` with the groups model/, data/ and optimizer/ on top of these
dataclasses (type errors are caught by OmegaConf); `validate(cfg)` then checks the values against
each other before any work is done and raises `ConfigError` naming the key, the value and what is
allowed. (`eval.lm`'s model and text are found on disk by `sae_sweep.lm_eval.check_lm_eval`; the
trainer's `check_config` runs both.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sae_sweep.checks import check_device, field_docs, fraction, one_of, positive, resolve_device
from sae_sweep.errors import ConfigError
from sae_sweep.models.base import ModelConfig
from sae_sweep.models.registry import (
    architecture,
    architectures,
    config_fields,
    load_plugins,
    resolve_model_config,
)
from sae_sweep.rundir import RESUME_IGNORED_KEYS

__all__ = ["ModelConfig"]  # re-exported: `model.*` schemas live with their architectures (sae_sweep.models)

DATA_KINDS = ("synthetic", "shards")
PRECISIONS = ("auto", "fp32", "bf16")
STACK_CHOICES = ("auto", "true", "false")  # train.stack


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic (built-in ground truth) | shards (a folder of activations)
    path: str | None = None  # shards: the folder; synthetic: cache root (null = outputs/data)
    test_fraction: float = 0.01  # share of tokens held out for evaluation (split by data.shuffle_seed)
    # seed of the held-out split and of the batch order; kept apart from the run's `seed` (initialisation
    # only), so a seed sweep compares initialisations on the same batches and its trials can be packed
    shuffle_seed: int = 0
    scale_factor: float | None = None  # input scale; null = sqrt(d_in) / mean ||x|| estimated
    scale_tokens: int = 1_000_000  # tokens used to estimate the scale factor (or all, if fewer)
    buffer_mb: int = 512  # shuffle buffer: RAM for raw activations held at once (bounded streaming)
    chunk_tokens: int = 4096  # rows read as one unit; the test split is made of whole chunks
    default_epochs: float = 1.0  # training budget when neither `tokens` nor `epochs` is given
    d_in: int = 128  # synthetic: activation width
    n_features: int = 512  # synthetic: number of true feature directions
    n_tokens: int = 1_000_000  # synthetic: tokens generated (train + test)
    true_l0: float = 4.0  # synthetic: mean number of true features firing per token
    zipf_exponent: float = 0.5  # synthetic: firing probability of feature i ~ 1 / (i + 1) ** exponent
    correlation: float = 0.3  # synthetic: strength of correlated firing (0 = independent)
    correlation_rank: int = 8  # synthetic: shared context factors behind correlated firing (its rank)
    hierarchy_frac: float = 0.1  # synthetic: share of features that only fire with a parent feature
    magnitude_mean: float = 1.0  # synthetic: mean magnitude of a firing feature
    magnitude_std: float = 0.25  # synthetic: spread of magnitudes (kept positive)
    # synthetic: spread of the features' mean magnitudes (log-normal sigma; 0 = all at magnitude_mean)
    feature_magnitude_spread: float = 0.0
    bias_norm: float = 1.0  # synthetic: norm of the constant offset added to every token
    noise_std: float = 0.01  # synthetic: per-dimension Gaussian noise
    data_seed: int = 0  # synthetic: seed of the generated data set (independent of the run seed)


@dataclass
class OptimizerConfig:
    name: str = "adam"  # optimizer (adam)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    lr_warmup_frac: float = 0.01  # share of steps over which lr rises linearly from 0
    lr_decay_frac: float = 0.2  # share of final steps over which lr decays linearly to 0
    l1_warmup_frac: float = 0.05  # share of steps over which l1_lambda rises linearly from 0
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)


@dataclass
class TrainConfig:
    log_every_tokens: int = 100_000  # a row of curves.csv every this many tokens
    checkpoint_every_s: float = 30.0  # seconds between atomic checkpoint.pt writes (and on Ctrl-C)
    dead_window: int = 10_000_000  # a latent silent for this many training tokens is dead
    eval_tokens: int | None = None  # cap on held-out tokens evaluated (null = the whole split)
    progress: bool = True  # show a tqdm progress bar
    stop_on_collapse: bool = True  # stop (status collapsed) if every latent goes silent after warm-up
    # matmuls of the forward pass: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16; weights,
    # optimizer state and the loss stay fp32 either way
    precision: str = "auto"
    # a pack's same-shape members (relu, topk, batchtopk, matryoshka_batchtopk) step as one stacked SAE
    # (train/stack.py): auto (on CUDA only; on CPU it measured slower) | true | false
    stack: str = "auto"


@dataclass
class SlurmConfig:
    """`sweep.launcher=slurm`: each of `sweep.workers` worker jobs runs the sweep's worker loop (submitit)."""

    partition: str | None = None  # SLURM partition; null = the cluster's default
    account: str | None = None  # SLURM account; null = your default
    qos: str | None = None  # SLURM quality of service; null = none
    time_min: int = 240  # wall-clock limit of each worker job in minutes (a killed job's trial resumes)
    cpus_per_task: int = 8  # CPU cores per worker job
    gpus_per_node: int = 0  # GPUs per worker job
    mem_gb: int = 32  # memory per worker job
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra sbatch options
    log_dir: str | None = None  # submitit's job folder (scripts, logs); null = <sweep dir>/slurm
    cluster: str = "slurm"  # submitit cluster: slurm, or local (runs the jobs here; for testing)
    wait: bool = False  # wait for the jobs and print the table (else print the job ids and return)


@dataclass
class SweepConfig:
    """`python -m sae_sweep -m key=a,b ...`: the sweep settings (section "Sweeps" of the README)."""

    sampler: str = "auto"  # auto (grid if every swept key is a list, else tpe) | grid | tpe | nsga2 | random
    study_name: str | None = None  # null = derived from the command (same command, same study)
    storage: str | None = None  # null = SQLite in the sweep dir; a postgresql/mysql URL; a .journal/.log file
    n_trials: int = 20  # Bayesian/random searches: trials in total, across restarts (grids run every point)
    workers: int = 1  # worker processes this command starts (each takes the next trial of the shared study)
    # before its first trial a worker waits (at most grace_s) until this many workers have joined the
    # study, so that copies of the command started together on several machines split a grid evenly
    wait_for_workers: int = 1
    # what to optimise: metric names from metrics.json, each "name" or "name:minimize|maximize"
    objectives: list[str] = field(default_factory=lambda: ["fvu", "l0"])
    seed: int | None = None  # sampler seed (worker i uses seed + i); null = random
    pruner: str = "auto"  # auto (median for Bayesian searches, none for grids) | median | none
    pruner_startup_trials: int = 5  # median pruner: trials that must have reached a step before pruning there
    pruner_warmup_rows: int = 10  # median pruner: curves.csv rows a trial trains before it can be pruned
    heartbeat_s: int = 30  # seconds between a running trial's heartbeats
    grace_s: int = 120  # a running trial without a heartbeat for this long is retried from its checkpoint
    threads_per_worker: int | None = None  # torch threads per worker; null = cores // workers
    # trials a worker trains together on one pass over shared batches (they must share data, batch_size
    # and device; anything else may differ); null = auto (up to 8 for a grid, 4 for a search, as memory
    # allows; see README "Packing"), 1 = one trial at a time
    pack: int | None = None
    report: bool = True  # at the end, write the full report (tables, plots); false = report/trials.csv only
    report_features: bool = True  # the full report builds and links a feature browser per Pareto trial
    launcher: str = "local"  # local (processes on this machine) | slurm (one job per worker, via submitit)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


SAMPLERS = ("auto", "grid", "tpe", "nsga2", "random")
PRUNERS = ("auto", "median", "none")
LAUNCHERS = ("local", "slurm")


@dataclass
class LMEvalConfig:
    enabled: bool = False  # compute ce_loss_score and delta_lm_loss (causal LMs only; costs LM forwards)
    # a harvest folder whose manifest.json names the model, layer, hook and text; null = the run's data.path
    harvest: str | None = None
    model: str | None = None  # override the manifest's model (a local folder, a .gguf file or a cached name)
    layer: int | None = None  # override the manifest's layer
    hook: str | None = None  # override the manifest's hook: resid_post | mlp_out | attn_out
    text: str | None = None  # override the manifest's text; its held-out documents are used
    # held-out tokens whose next-token loss is averaged (the cost per trial grows with it; README "LM loss")
    tokens: int = 4096
    batch_size: int = 8  # sequences per forward pass
    device: str = "auto"  # auto | cpu | cuda: where the language model runs


@dataclass
class EvalConfig:
    # eval.lm.*: splice the SAE into a causal LM on held-out text (ce_loss_score, delta_lm_loss)
    lm: LMEvalConfig = field(default_factory=LMEvalConfig)


@dataclass
class Config:
    # model=NAME selects an architecture; its keys are model.* (the architecture's config class)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # extra held-out evaluations
    l1_lambda: float | None = None  # sparsity coefficient (relu: L1, jumprelu: L0); null = recipe
    # learning rate; null = the recipe: the architecture's rule for d_in, width, k and the optimizer steps
    # the budget allows (sae_sweep/recipe.py)
    lr: float | None = None
    lr_scale: float = 1.0  # multiplies the recipe's lr (lr null only): `-m lr_check` sweeps it around 1
    # tokens per optimizer step; null = the recipe: 4096, and for the TopK family halved (down to 1024)
    # while the budget allows fewer than 400 steps (sae_sweep/recipe.py)
    batch_size: int | None = None
    hidden_dim: int | None = None  # SAE width (latents); null = 8 * d_in
    tokens: int | None = None  # training budget in tokens; null = `epochs`
    epochs: float | None = None  # budget in passes over the train split; null = data.default_epochs
    seed: int = 0  # seed of the SAE's initialisation (data.shuffle_seed orders the data)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    out_dir: str = MISSING  # run directory (set from hydra.run.dir by the CLI)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # used by `-m` sweeps only

    def __post_init__(self) -> None:
        # Config() from Python gets the named architecture's keys and defaults, as model=NAME does.
        if type(self.model) is ModelConfig:
            self.model = resolve_model_config(self.model)


def keys_help() -> str:
    """Every config key with its documentation, for `--help`."""
    sections = [
        ("", Config),
        ("data.", DataConfig),
        ("optimizer.", OptimizerConfig),
        ("train.", TrainConfig),
        ("sweep.", SweepConfig),
        ("sweep.slurm.", SlurmConfig),
        ("eval.lm.", LMEvalConfig),
    ]
    lines = []
    for prefix, cls in sections:
        for name, doc in field_docs(cls).items():
            if doc and name != "out_dir":
                lines.append(f"  {prefix + name:<28} {doc}")
        if prefix == "":
            lines += _model_keys_help()
    return "\n".join(lines)


def _model_keys_help() -> list[str]:
    """`model.*` keys of every registered architecture, each with the architectures that have it."""
    names = ", ".join(architectures())
    rows: dict[tuple[str, str], list[str]] = {("name", f"architecture: {names} (model=NAME)"): []}
    for name, cls in architectures().items():
        for key, owner in config_fields(cls.config_class):
            if key != "name":
                rows.setdefault((key, field_docs(owner).get(key, "")), []).append(name)
    lines = [
        f"  {'model=' + name:<28} {cls.family} family; {cls.penalty}" for name, cls in architectures().items()
    ]
    return lines + [
        f"  {'model.' + key:<28} {', '.join(archs) + ': ' if archs else ''}{doc}"
        for (key, doc), archs in rows.items()
    ]


def resolve_recipe(
    arch: str,
    d_in: int,
    hidden_dim: int | None,
    l1_lambda: float | None,
    lr: float | None,
    steps: int | None = None,
    k: int | None = None,
) -> tuple[int, float | None, float]:
    """(hidden, l1_lambda, lr) a run uses when those keys are null; l1_lambda is None where unused.

    With `steps` (the optimizer steps the budget allows) a null lr is the budget-aware recipe value
    (sae_sweep/recipe.py); without, the architecture's long-budget rule (its class's `default_lr`).
    `lr_scale` is not applied here.
    """
    from sae_sweep.recipe import budget_lr

    cls = architecture(arch)
    hidden, coef, base = cls.recipe(d_in, hidden_dim, l1_lambda, None)
    if lr is not None:
        return hidden, coef, lr
    return hidden, coef, base if steps is None else budget_lr(base, arch, d_in, hidden, k, steps)


def resolve_batch_size(cfg: Config | DictConfig, n_train_tokens: int | None = None) -> int | None:
    """The batch size a run uses: `batch_size`, or when null the recipe's for its architecture and budget
    (sae_sweep.recipe.budget_batch_size). None only when that depends on an epochs budget and
    `n_train_tokens` (the train split's size) is not given."""
    from sae_sweep.recipe import budget_batch_size

    if cfg.batch_size is not None:
        return int(cfg.batch_size)
    if cfg.tokens is not None:
        budget: int | None = int(cfg.tokens)
    elif n_train_tokens is not None:
        epochs = cfg.epochs if cfg.epochs is not None else cfg.data.default_epochs
        budget = math.ceil(epochs * n_train_tokens)
    else:
        budget = None
    return budget_batch_size(cfg.model.name, budget)


def run_name(override_dirname: str) -> str:
    """A directory name from the command's overrides ('default' for none); no nested folders."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    return name[:200] or "default"


def register_configs() -> None:
    """The schema and the resolvers conf/config.yaml uses; before Hydra composes (CLI, compose_config)."""
    # The schema of the whole tree; the `model` group is one schema per registered architecture.
    load_plugins()
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("sae_sweep_keys_help"):
        OmegaConf.register_new_resolver("sae_sweep_keys_help", keys_help)
    if not OmegaConf.has_resolver("sae_sweep_run_name"):
        OmegaConf.register_new_resolver("sae_sweep_run_name", run_name)
    if not OmegaConf.has_resolver("sae_sweep_not_identity"):
        # The keys left out of a run directory's name: the ones that are not a run's identity.
        OmegaConf.register_new_resolver("sae_sweep_not_identity", lambda: list(RESUME_IGNORED_KEYS))


def validate(cfg: Config | DictConfig) -> None:
    """Check every value against what is allowed, before any work; raise ConfigError on the first."""
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
    model = resolve_model_config(m)  # ConfigError for an unknown architecture or key
    one_of("data", d.kind, DATA_KINDS)
    check_device(cfg.device)
    if o.name != "adam":
        raise ConfigError("optimizer", o.name, "adam")

    if cfg.hidden_dim is not None and cfg.hidden_dim < 1:
        raise ConfigError("hidden_dim", cfg.hidden_dim, "a positive integer (number of latents)")
    architecture(model.name).check_config(model, cfg.l1_lambda, cfg.hidden_dim)
    architecture(model.name).check_device(model, resolve_device(cfg.device))
    positive("lr", cfg.lr, allow_none=True)
    positive("lr_scale", cfg.lr_scale)
    if cfg.lr is not None and cfg.lr_scale != 1:
        raise ConfigError("lr_scale", cfg.lr_scale, f"1 when lr is set (lr={cfg.lr:g} is used as given)")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ConfigError("batch_size", cfg.batch_size, "a positive integer (tokens per step), or null")
    if cfg.tokens is not None and cfg.epochs is not None:
        raise ConfigError("tokens", cfg.tokens, "null when epochs is set: give one training budget")
    positive("tokens", cfg.tokens, allow_none=True)
    positive("epochs", cfg.epochs, allow_none=True)

    if d.kind == "shards":
        if d.path is None:
            raise ConfigError("data.path", None, "the folder of activation shards (.npy, .pt, .safetensors)")
        if not Path(d.path).is_dir():
            raise ConfigError("data.path", d.path, "an existing folder of activation shards")
    if not 0 < d.test_fraction < 1:
        raise ConfigError("data.test_fraction", d.test_fraction, "a fraction in (0, 1)")
    positive("data.scale_factor", d.scale_factor, allow_none=True)
    positive("data.scale_tokens", d.scale_tokens)
    positive("data.buffer_mb", d.buffer_mb)
    positive("data.chunk_tokens", d.chunk_tokens)
    positive("data.default_epochs", d.default_epochs)
    if d.kind == "synthetic":
        for key in ("d_in", "n_features", "n_tokens", "true_l0", "magnitude_mean"):
            positive(f"data.{key}", getattr(d, key))
        if d.true_l0 > d.n_features:
            raise ConfigError("data.true_l0", d.true_l0, f"at most data.n_features ({d.n_features})")
        positive("data.correlation_rank", d.correlation_rank)
        for key in ("zipf_exponent", "magnitude_std", "bias_norm", "noise_std", "feature_magnitude_spread"):
            if getattr(d, key) < 0:
                raise ConfigError(f"data.{key}", getattr(d, key), "a number >= 0")
        fraction("data.correlation", d.correlation, upper_open=False)
        fraction("data.hierarchy_frac", d.hierarchy_frac)

    for key in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac"):
        fraction(f"optimizer.{key}", getattr(o, key), upper_open=False)
    if o.lr_warmup_frac + o.lr_decay_frac > 1:
        raise ConfigError("optimizer.lr_decay_frac", o.lr_decay_frac, "at most 1 - optimizer.lr_warmup_frac")
    if o.grad_clip < 0:
        raise ConfigError("optimizer.grad_clip", o.grad_clip, "a number >= 0 (0 = no clipping)")
    fraction("optimizer.beta1", o.beta1)
    fraction("optimizer.beta2", o.beta2)
    positive("optimizer.eps", o.eps)
    one_of("train.precision", t.precision, PRECISIONS)
    one_of("train.stack", str(t.stack).lower(), STACK_CHOICES)
    positive("train.log_every_tokens", t.log_every_tokens)
    positive("train.checkpoint_every_s", t.checkpoint_every_s)
    positive("train.dead_window", t.dead_window)
    positive("train.eval_tokens", t.eval_tokens, allow_none=True)


def validate_sweep(s: SweepConfig | DictConfig) -> None:
    """Check the `sweep.*` settings (the sweep driver checks the objectives: it knows the metrics)."""
    one_of("sweep", s.sampler, SAMPLERS)
    one_of("sweep.pruner", s.pruner, PRUNERS)
    one_of("sweep.launcher", s.launcher, LAUNCHERS)
    for key in ("n_trials", "workers", "wait_for_workers", "heartbeat_s", "grace_s"):
        positive(f"sweep.{key}", getattr(s, key))
    positive("sweep.threads_per_worker", s.threads_per_worker, allow_none=True)
    positive("sweep.pack", s.pack, allow_none=True)
    if s.grace_s <= s.heartbeat_s:
        raise ConfigError("sweep.grace_s", s.grace_s, f"more than sweep.heartbeat_s ({s.heartbeat_s})")
    if s.pruner_startup_trials < 1 or s.pruner_warmup_rows < 0:
        key = "pruner_startup_trials" if s.pruner_startup_trials < 1 else "pruner_warmup_rows"
        raise ConfigError(f"sweep.{key}", getattr(s, key), "a positive integer")
    if not s.objectives:
        raise ConfigError("sweep.objectives", list(s.objectives), "at least one metric name")
    if s.study_name is not None and (not s.study_name or "/" in s.study_name):
        raise ConfigError("sweep.study_name", s.study_name, "a non-empty name without '/'")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
