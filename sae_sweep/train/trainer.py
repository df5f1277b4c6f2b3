"""train(cfg): one SAE from config to a finished run directory (DESIGN section 4).

The single-run CLI and every sweep trial call this same function. Steps: validate -> open data ->
scale factor -> build model -> (resume from checkpoint.pt) -> train loop -> held-out evaluation ->
write sae.safetensors, metrics.json, curves.csv.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sae_sweep import rundir
from sae_sweep.config import TOPK_FAMILY, USES_SPARSITY_COEF, Config, resolve_recipe, validate
from sae_sweep.data import open_dataset
from sae_sweep.data.device_feed import DeviceFeed
from sae_sweep.errors import ConfigError, SaeSweepError
from sae_sweep.metrics import (
    DeadLatentTracker,
    EvalAccumulator,
    F1Accumulator,
    density_histogram,
    match_features,
)
from sae_sweep.models import SAE, build_sae, save_sae
from sae_sweep.train.checkpoint import read_checkpoint, remove_checkpoint, write_checkpoint
from sae_sweep.train.schedule import lr_multiplier, sparsity_coefficient

log = logging.getLogger("sae_sweep")

INIT_SAMPLE_TOKENS = 16_384  # enough for the mean b_dec starts at; 200 MB at d_in 3072


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


def stream_key(cfg: Config | DictConfig) -> str:
    """What runs must agree on to share batches (train_pack): the data, its order, batch size, device."""
    cfg = _as_dictconfig(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return json.dumps([data, cfg.batch_size, str(resolve_device(cfg.device))], sort_keys=True)


OnLog = Callable[[dict[str, float]], None]
# A run whose mean L0 stays below this after the sparsity warm-up has collapsed (< 1 firing per 100 tokens).
COLLAPSED_L0 = 0.01


@dataclass
class RunState:
    """What the loop carries and checkpoints besides model and optimizer."""

    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    # running sums (loss, mse, l0) and step count since the last curves row
    interval_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    interval_steps: int = 0
    curves: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _as_dictconfig(cfg: Config | DictConfig) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.structured(cfg)


class StopRequests:
    """Turns SIGINT/SIGTERM into a request the loop honours between steps, so the checkpoint it then
    writes is consistent (a signal mid-step would leave weights and step counter out of step)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SharedData:
    """The data side of a run, opened once for every member of a pack (they share data config and seed):
    the dataset, its scale factor and the sample that initialises b_dec."""

    def __init__(self, data_cfg: Any, progress: bool) -> None:
        self.cfg = data_cfg
        self.dataset = open_dataset(data_cfg, progress=progress)
        self._scale: tuple[float, float] | None = None
        self._sample: torch.Tensor | None = None

    def scale(self) -> tuple[float, float]:
        """(scale factor, raw mean norm), estimated once."""
        if self._scale is None:
            cfg = self.cfg
            if cfg.scale_factor is not None:
                _, raw_mean_norm = self.dataset.estimate_scale(min(cfg.scale_tokens, INIT_SAMPLE_TOKENS))
                self._scale = (float(cfg.scale_factor), raw_mean_norm)
            else:
                log.info("estimating the scale factor on up to %d tokens", cfg.scale_tokens)
                self._scale = self.dataset.estimate_scale(cfg.scale_tokens)
            log.info(
                "raw mean norm %.4g, scale factor %.4g (E||x|| = sqrt(%d))",
                self._scale[1],
                self._scale[0],
                self.dataset.d_in,
            )
        return self._scale

    def init_sample(self) -> torch.Tensor:
        """Raw train tokens the models initialise from (b_dec = their mean after scaling)."""
        if self._sample is None:
            self._sample = self.dataset.sample(min(INIT_SAMPLE_TOKENS, self.dataset.n_train_tokens))
        return self._sample


class Trainer:
    """One training run: model, optimizer, state, run directory. `train(cfg)` trains one; `train_pack`
    steps several on the same batches. The loop that feeds batches is `_run_pack`."""

    def __init__(self, cfg: Config | DictConfig, on_log: OnLog | None = None):
        self.on_log = on_log
        self.cfg = _as_dictconfig(cfg)
        validate(self.cfg)
        self.run_dir = Path(self.cfg.out_dir)
        self.device = resolve_device(self.cfg.device)
        self.cfg_dict: dict[str, Any] = OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[assignment]

    def previous_outcome(self) -> dict[str, Any] | None:
        """The metrics of a run already finished in run_dir (None if there is none to reuse); raises
        RunStopped for a run that stopped early, ConfigError for a different run in the directory."""
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.check_same_run(run_dir, self.cfg_dict)
        finished = rundir.read_metrics(run_dir)
        if finished is not None and not (run_dir / rundir.CHECKPOINT).is_file():
            if finished.get("status") == "completed":
                log.info("run in %s already finished; nothing to do", run_dir)
                return finished
            if finished.get("status") in ("diverged", "collapsed", "pruned"):
                raise RunStopped(
                    finished["status"], finished.get("reason", "") + f" (earlier run in {run_dir})"
                )
        rundir.write_config(run_dir / rundir.CONFIG, self.cfg)
        return None

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, shared: SharedData | None = None) -> None:
        cfg = self.cfg
        shared = shared if shared is not None else SharedData(cfg.data, cfg.train.progress)
        self.shared = shared
        self.data = shared.dataset
        d_in = self.data.d_in
        arch = cfg.model.name
        self.hidden, coef, self.lr = resolve_recipe(arch, d_in, cfg.hidden_dim, cfg.l1_lambda, cfg.lr)
        self.l1_lambda = coef or 0.0
        if arch in TOPK_FAMILY and cfg.model.k > self.hidden:
            raise ConfigError("model.k", cfg.model.k, f"at most hidden_dim ({self.hidden})")
        if cfg.batch_size > self.data.n_train_tokens:
            raise ConfigError(
                "batch_size",
                cfg.batch_size,
                f"at most the {self.data.n_train_tokens} tokens of the train split",
            )
        if cfg.tokens is not None:
            budget = cfg.tokens
        else:
            epochs = cfg.epochs if cfg.epochs is not None else cfg.data.default_epochs
            budget = math.ceil(epochs * self.data.n_train_tokens)
        self.total_steps = max(1, math.ceil(budget / cfg.batch_size))
        self.batches_per_epoch = self.data.batches_per_epoch(cfg.batch_size)
        self.log_every_steps = max(1, round(cfg.train.log_every_tokens / cfg.batch_size))

        generator = torch.Generator().manual_seed(cfg.seed)
        self.sae: SAE = build_sae(cfg.model, d_in, self.hidden, generator)
        self.dead = DeadLatentTracker(self.hidden, cfg.train.dead_window, self.device)
        self.state = RunState()
        self.resumed_from_tokens = 0

        checkpoint = read_checkpoint(self.run_dir)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._fresh_start()
        self.sae.to(self.device)
        self.optimizer = self._make_optimizer()
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        precision = cfg.train.precision
        self.use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.sums = torch.tensor(self.state.interval_sums, device=self.device)
        self.n_in_sums = self.state.interval_steps

    def _fresh_start(self) -> None:
        self.scale_factor, self.raw_mean_norm = self.shared.scale()
        self.sae.init_from_data(self.shared.init_sample() * self.scale_factor)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        diff = rundir.run_difference(checkpoint["config"], self.cfg_dict)
        if diff is not None:
            raise ConfigError(
                "hydra.run.dir",
                str(self.run_dir),
                f"the same config as its checkpoint.pt to resume, but {diff}; use another run directory",
            )
        self.sae.load_state_dict(checkpoint["model"])
        self.dead.load_state_dict(checkpoint["dead"])
        self.state = RunState(**checkpoint["state"])
        self.scale_factor = checkpoint["scale_factor"]
        self.raw_mean_norm = checkpoint["raw_mean_norm"]
        self.resumed_from_tokens = self.state.tokens_seen
        log.info("resuming from checkpoint at %d tokens (step %d)", self.state.tokens_seen, self.state.step)

    def _make_optimizer(self) -> torch.optim.Adam:
        o = self.cfg.optimizer
        fused = self.device.type == "cuda"
        return torch.optim.Adam(
            self.sae.parameters(), lr=self.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused
        )

    # --- the steps ----------------------------------------------------------------------------
    @property
    def next_batch(self) -> int:
        """Index (counted from the first epoch's first batch) of the batch this run trains on next."""
        return self.state.epoch * self.batches_per_epoch + self.state.batch_in_epoch

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps

    def checkpoint(self) -> None:
        """Write checkpoint.pt; a run whose loss went non-finite since the last row stops as diverged."""
        if not bool(torch.isfinite(self.sums).all()):
            self.end_interval()  # raises TrainingDiverged
        self.state.interval_sums = self.sums.tolist()
        self.state.interval_steps = self.n_in_sums
        write_checkpoint(
            self.run_dir,
            {
                "config": self.cfg_dict,
                "model": self.sae.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "dead": self.dead.state_dict(),
                "state": self.state.__dict__,
                "scale_factor": self.scale_factor,
                "raw_mean_norm": self.raw_mean_norm,
            },
        )

    def _train_step(self, x_BD: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = self.cfg.optimizer
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_multiplier(step, self.total_steps, o.lr_warmup_frac, o.lr_decay_frac)
        coef = sparsity_coefficient(step, self.total_steps, self.l1_lambda, o.l1_warmup_frac)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()
        with autocast:
            out = self.sae(x_BD)
        loss = out.mse + coef * out.sparsity + out.aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.before_optimizer_step()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), o.grad_clip, foreach=True)
        self.optimizer.step()
        self.sae.after_optimizer_step(out.fired_H, x_BD.shape[0])
        self.dead.update(out.fired_H, x_BD.shape[0])
        return loss.detach(), out.mse.detach(), out.l0.detach()

    def step(self, x: torch.Tensor, epoch: int, batch_in_epoch: int) -> bool:
        """One optimizer step on a scaled batch already on the device; True when a log row is due."""
        st = self.state
        loss, mse, l0 = self._train_step(x, st.step)
        self.sums += torch.stack((loss, mse, l0))  # stays on the device: no host sync per step
        self.n_in_sums += 1
        st.step += 1
        st.tokens_seen += x.shape[0]
        st.epoch, st.batch_in_epoch = epoch, batch_in_epoch + 1
        return st.step % self.log_every_steps == 0 or st.step == self.total_steps

    def end_interval(self) -> None:
        """Close a curves.csv row: the only host sync, once per row. May raise RunStopped (diverged,
        collapsed, or pruned by the on_log callback)."""
        st = self.state
        means = (self.sums / max(self.n_in_sums, 1)).tolist()
        self.sums.zero_()
        self.n_in_sums = 0
        if not all(math.isfinite(v) for v in means):
            raise TrainingDiverged(
                f"loss became {means[0]} between steps {st.step - self.log_every_steps} and {st.step} "
                f"(lr={self.lr:g}, l1_lambda={self.l1_lambda:g}); lower lr or l1_lambda"
            )
        self._log_row(means)
        self._check_collapse(means[2])
        if self.on_log is not None:
            self.on_log(st.curves[-1])

    def postfix(self) -> dict[str, str]:
        row = self.state.curves[-1] if self.state.curves else {}
        return {
            "mse": f"{row.get('mse', float('nan')):.4g}",
            "l0": f"{row.get('l0', float('nan')):.1f}",
            "dead": f"{self.dead.dead_frac():.1%}",
        }

    def _check_collapse(self, interval_l0: float) -> None:
        st, o = self.state, self.cfg.optimizer
        settled = st.step >= max(2 * o.l1_warmup_frac, 0.2) * self.total_steps
        if self.cfg.train.stop_on_collapse and settled and interval_l0 < COLLAPSED_L0:
            raise TrainingCollapsed(
                f"mean L0 {interval_l0:.2g} at {st.tokens_seen} tokens: every latent has gone silent "
                f"(l1_lambda={self.l1_lambda:g}, lr={self.lr:g}); lower l1_lambda or lr"
            )

    def _log_row(self, means: list[float]) -> None:
        st = self.state
        o = self.cfg.optimizer
        st.curves.append(
            {
                "tokens": st.tokens_seen,
                "step": st.step,
                "lr": self.lr
                * lr_multiplier(st.step - 1, self.total_steps, o.lr_warmup_frac, o.lr_decay_frac),
                "l1_lambda": sparsity_coefficient(
                    st.step - 1, self.total_steps, self.l1_lambda, o.l1_warmup_frac
                ),
                "loss": means[0],
                "mse": means[1],
                "l0": means[2],
                "dead_frac": self.dead.dead_frac(),
                "tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds > 0 else float("nan"),
            }
        )

    # --- evaluation and outputs ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        self.sae.eval()
        acc = EvalAccumulator(self.hidden, self.device)
        truth = self.data.ground_truth
        f1_acc = None
        metrics: dict[str, Any] = {}
        self.latents: dict[str, list[Any]] = {}  # per-latent ground-truth scores, aligned to latent index
        if truth is not None:
            true_idx, latent_idx, abs_cos = match_features(
                truth.features, self.sae.W_dec.detach().float().cpu()
            )
            metrics["mcc"] = float(abs_cos.mean())
            f1_acc = F1Accumulator(true_idx.to(self.device), latent_idx.to(self.device))
        dec_norms = self.sae.dec_norms().float()
        batches = self.data.test_batches(
            self.cfg.batch_size, self.cfg.train.eval_tokens, with_truth=truth is not None
        )
        for item in batches:
            x_raw, active = item if truth is not None else (item, None)
            x = x_raw.to(self.device) * self.scale_factor
            f = self.sae.encode(x)
            x_hat = self.sae.decode(f)
            acc.update(x, x_hat, f, dec_norms)
            if f1_acc is not None:
                f1_acc.update(f, active.to(self.device))
        metrics.update(acc.compute())
        if f1_acc is not None:
            f1 = f1_acc.compute()
            metrics["f1"] = float(f1["f1_mean"])
            self.latents = _per_latent(
                self.hidden,
                latent_idx,
                {
                    "matched_feature": true_idx,
                    "match_cos": abs_cos,
                    "f1": f1["f1"],
                    "precision": f1["precision"],
                    "recall": f1["recall"],
                },
            )
        sparsity = metrics["l0"] if self.cfg.model.name == "jumprelu" else metrics["l1"]
        metrics["loss"] = metrics["mse"] + self.l1_lambda * sparsity
        self.density = acc.density().cpu()
        self.sae.train()
        return metrics

    def final_metrics(self, eval_metrics: dict[str, Any]) -> dict[str, Any]:
        st = self.state
        dead_frac = self.dead.dead_frac()
        metrics = dict(eval_metrics)
        metrics.update(
            {
                "dead_frac": dead_frac,
                "alive_frac": 1.0 - dead_frac,
                "dead_window_tokens": self.dead.window_used(),
                "tokens": st.tokens_seen,
                "steps": st.step,
                "tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds > 0 else float("nan"),
                "train_seconds": st.train_seconds,
                "resumed_from_tokens": self.resumed_from_tokens,
                "architecture": self.cfg.model.name,
                "d_in": self.data.d_in,
                "hidden_dim": self.hidden,
                "l1_lambda": self.l1_lambda if self.cfg.model.name in USES_SPARSITY_COEF else None,
                "k": self.cfg.model.k,
                "lr": self.lr,
                "batch_size": self.cfg.batch_size,
                "scale_factor": self.scale_factor,
                "raw_mean_norm": self.raw_mean_norm,
                "status": "completed",
            }
        )
        return metrics

    def finish(self) -> dict[str, Any]:
        """Evaluate the finished run, write its outputs, drop its checkpoint; returns its metrics."""
        metrics = self.final_metrics(self.evaluate())
        if self.cfg.eval.lm.enabled:
            from sae_sweep.lm_eval import lm_eval_metrics

            data_path = self.cfg.data.path if self.cfg.data.kind == "shards" else None
            metrics.update(lm_eval_metrics(self.sae, self.cfg.eval.lm, data_path, self.scale_factor))
        save_sae(self.sae, self.run_dir / rundir.SAE, self.scale_factor, self.raw_mean_norm)
        rundir.write_csv(self.run_dir / rundir.CURVES, self.state.curves)
        hist = density_histogram(self.density)
        rundir.write_json(
            self.run_dir / rundir.DENSITY,
            {"density": self.density.tolist(), "histogram": hist, **self.latents},
        )
        rundir.write_json(self.run_dir / rundir.METRICS, metrics)
        remove_checkpoint(self.run_dir)
        return metrics

    def record_stop(self, err: RunStopped) -> None:
        """A run that stopped early: metrics.json gets its status and reason; no SAE is written."""
        last = self.state.curves[-1] if self.state.curves else {}
        metrics = {**last, "status": err.status, "reason": err.reason, "tokens": self.state.tokens_seen}
        rundir.write_json(self.run_dir / rundir.METRICS, metrics)
        rundir.write_csv(self.run_dir / rundir.CURVES, self.state.curves)
        remove_checkpoint(self.run_dir)


Outcome = dict[str, Any] | BaseException  # a member's metrics, or why it has none


class PackInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during train_pack: `outcomes` holds the members that had ended by then (by index
    in the configs); every other member wrote its checkpoint and resumes from it."""

    def __init__(self, outcomes: dict[int, Outcome]) -> None:
        super().__init__()
        self.outcomes = outcomes


# A pack steps each member through a window of shared batches before the next member's turn: its weights
# and Adam state stay in cache for the window (on this CPU round-robin stepping of 8 small SAEs lost
# 5-15% to cache misses), while the window's batches are read once for every member.
WINDOW_BYTES = 64 * 2**20
MAX_WINDOW = 8


def _window(n_members: int, batch_size: int, d_in: int) -> int:
    if n_members == 1:
        return 1
    return max(1, min(MAX_WINDOW, WINDOW_BYTES // (4 * batch_size * d_in)))


def _run_pack(members: list[Trainer], outcomes: dict[int, Outcome]) -> None:
    """Train set-up members (same data, batch size, device) on one stream of batches until each has
    finished or stopped; outcomes[i] gets member i's metrics or exception. Members resumed further
    along wait until the stream reaches them, so each sees exactly the batches it would alone."""
    first = members[0]
    cfg = first.cfg
    active = dict(enumerate(members))
    start = min(m.next_batch for m in members)
    per_epoch = first.batches_per_epoch
    batches = DeviceFeed(
        first.data.train_batches(cfg.batch_size, start // per_epoch, start % per_epoch), first.device
    )
    window = _window(len(members), cfg.batch_size, first.data.d_in)
    checkpoint_every_s = min(m.cfg.train.checkpoint_every_s for m in members)
    sync = first.device.type == "cuda"
    bar = tqdm(
        total=sum(m.total_steps for m in members),
        initial=sum(m.state.step for m in members),
        disable=not cfg.train.progress,
        unit="step",
        desc=(
            f"{cfg.model.name} h={first.hidden}"
            if len(members) == 1
            else f"pack of {len(members)} on shared batches"
        ),
        dynamic_ncols=True,
    )

    def end(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        del active[i]

    def checkpoint_all() -> None:
        for i, m in list(active.items()):
            try:
                m.checkpoint()
            except RunStopped as err:
                m.record_stop(err)
                end(i, err)

    last_checkpoint = time.monotonic()
    try:
        with StopRequests() as stop:
            while active:
                if stop.requested:
                    checkpoint_all()
                    if not active:  # every run had ended (e.g. diverged): nothing to resume
                        break
                    log.warning(
                        "stopped by %s at %s; checkpoint written, re-run the same command to resume",
                        stop.requested,
                        ", ".join(f"{m.state.tokens_seen} tokens" for m in active.values()),
                    )
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                shared = []  # (epoch, batch in epoch, index, x raw on the device)
                for _ in range(window):
                    epoch, batch_in_epoch, x_dev = next(batches)
                    shared.append((epoch, batch_in_epoch, epoch * per_epoch + batch_in_epoch, x_dev))
                scaled: dict[tuple[float, int], torch.Tensor] = {}  # one product per scale factor
                steps_done: dict[int, int] = {}
                logged = False  # on CUDA the host waits for the device only in windows that log a row
                outside = 0.0  # seconds spent evaluating finished runs: not training time
                for i, m in list(active.items()):
                    for epoch, batch_in_epoch, index, x_dev in shared:
                        if i not in active or stop.requested:
                            break
                        if m.next_batch != index:
                            continue
                        key = (m.scale_factor, index)
                        if key not in scaled:
                            scaled[key] = x_dev * m.scale_factor
                        try:
                            due = m.step(scaled[key], epoch, batch_in_epoch)
                            steps_done[i] = steps_done.get(i, 0) + 1
                            if due:
                                logged = True
                                m.end_interval()
                                if m.finished:
                                    t_finish = time.perf_counter()
                                    end(i, m.finish())
                                    outside += time.perf_counter() - t_finish
                        except RunStopped as err:
                            m.record_stop(err)
                            end(i, err)
                        except Exception as err:  # a bug in one member's model must not end the others
                            log.exception("run in %s failed", m.run_dir)
                            end(i, err)
                if sync and logged:  # a log row synced the host already: settle the rest of the window
                    torch.cuda.synchronize()  # so the wall-clock split below is the real one
                elapsed = time.perf_counter() - t0 - outside
                total = sum(steps_done.values())
                for i, n in steps_done.items():
                    members[i].state.train_seconds += elapsed * n / total
                bar.update(total)
                if len(members) == 1 and first.state.curves:
                    bar.set_postfix(first.postfix(), refresh=False)
                elif len(members) > 1:
                    bar.set_postfix(running=len(active), refresh=False)
                if active and time.monotonic() - last_checkpoint >= checkpoint_every_s:
                    checkpoint_all()
                    last_checkpoint = time.monotonic()
    finally:
        bar.close()
        batches.close()


def train_pack(cfgs: list[Config | DictConfig], on_logs: list[OnLog | None] | None = None) -> list[Outcome]:
    """Train several runs on one pass over shared batches; returns each run's metrics, or the exception
    that stopped it (RunStopped, a SaeSweepError, or another error), in the order of `cfgs`.

    Every config must name the same data, data.shuffle_seed, batch_size and device (stream_key);
    the runs may differ in anything else (architecture, width, l1_lambda, lr, k, seed, budget). Each run
    keeps its own directory, checkpoint, curves and metrics, and gets exactly the result `train(cfg)`
    gives it. Ctrl-C or SIGTERM checkpoints every unfinished run and raises PackInterrupted, which carries
    the outcomes of the runs that had ended.
    """
    on_logs = on_logs if on_logs is not None else [None] * len(cfgs)
    outcomes: dict[int, Outcome] = {}
    members: dict[int, Trainer] = {}
    for i, (cfg, on_log) in enumerate(zip(cfgs, on_logs, strict=True)):
        try:
            member = Trainer(cfg, on_log)
            finished = member.previous_outcome()
        except (SaeSweepError, RunStopped) as err:
            outcomes[i] = err
            continue
        if finished is not None:
            outcomes[i] = finished
        else:
            members[i] = member
    keys = {stream_key(m.cfg) for m in members.values()}
    if len(keys) > 1:
        raise ValueError(
            "train_pack: the configs differ in data, batch_size or device; they cannot share batches"
        )
    if members:
        first = next(iter(members.values()))
        try:
            shared = SharedData(first.cfg.data, first.cfg.train.progress)
        except SaeSweepError as err:  # the data itself: every member fails the same way
            return [outcomes.get(i, err) for i in range(len(cfgs))]
        ready: dict[int, Trainer] = {}
        for i, member in members.items():
            try:
                member.setup(shared)
                ready[i] = member
            except SaeSweepError as err:
                outcomes[i] = err
        if ready:
            order = list(ready)
            sub: dict[int, Outcome] = {}
            try:
                _run_pack([ready[i] for i in order], sub)
            except KeyboardInterrupt:
                outcomes.update({order[j]: outcome for j, outcome in sub.items()})
                raise PackInterrupted(outcomes) from None
            for j, outcome in sub.items():
                outcomes[order[j]] = outcome
    return [outcomes[i] for i in range(len(cfgs))]


def _per_latent(hidden: int, latent_idx: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, list]:
    """Spread per-matched-pair values onto latent positions (None for latents matched to no feature)."""
    out: dict[str, list] = {}
    positions = latent_idx.tolist()
    for name, vals in values.items():
        column: list[Any] = [None] * hidden
        for pos, v in zip(positions, vals.tolist(), strict=True):
            column[pos] = v
        out[name] = column
    return out


def summary_line(metrics: dict[str, Any]) -> str:
    parts = [f"{metrics.get('status', '?')}:"]
    for key in ("mse", "explained_variance", "l0", "dead_frac", "mcc"):
        if metrics.get(key) is not None:
            parts.append(f"{key}={metrics[key]:.4g}")
    return " ".join(parts)


def train(cfg: Config | DictConfig, on_log: OnLog | None = None) -> dict[str, Any]:
    """Train one SAE into cfg.out_dir and return its metrics (also written to metrics.json).

    Re-running with the same config in the same directory resumes from checkpoint.pt, or returns
    the finished run's metrics without training again (raises RunStopped again for a run that
    stopped early). `on_log(row)` sees every curves.csv row as it is written; it may raise
    RunStopped (e.g. a pruner) to end the run. This is `train_pack` with one member.
    """
    trainer = Trainer(cfg, on_log)
    finished = trainer.previous_outcome()
    if finished is not None:
        return finished
    trainer.setup()
    outcomes: dict[int, Outcome] = {}
    _run_pack([trainer], outcomes)
    outcome = outcomes[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
