"""train(cfg): one SAE from config to a finished run directory.

The single-run CLI and every sweep trial come here. A run's steps: check the run directory (a finished
run is returned, a different one refused) -> open the data -> size the run from its recipe -> build
the model -> resume from checkpoint.pt or initialise from data -> the batch loop (loop.run_pack) ->
held-out evaluation (evaluate.evaluate_sae) -> write sae.safetensors, curves.csv, density.json and
metrics.json (rundir). The `Trainer` below holds one run's state and does each of those steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from sae_sweep import rundir
from sae_sweep.checks import resolve_device
from sae_sweep.config import Config, resolve_batch_size, resolve_recipe, validate
from sae_sweep.errors import (
    ConfigError,
    RunStopped,
    TrainingCollapsed,
    TrainingDiverged,
)
from sae_sweep.lm_eval import check_lm_eval, lm_eval_metrics
from sae_sweep.measures import DeadLatentTracker
from sae_sweep.metrics import COLLAPSED_FVU
from sae_sweep.models import SAE, architecture, build_sae, resolve_model_config
from sae_sweep.recipe import l1_lambda_note
from sae_sweep.rundir import Metrics
from sae_sweep.train.checkpoint import RunState, read_checkpoint, write_checkpoint
from sae_sweep.train.evaluate import evaluate_sae
from sae_sweep.train.loop import Outcome, SharedData, as_dictconfig, run_pack
from sae_sweep.train.optim import Adam, clip_gradients
from sae_sweep.train.outputs import write_finished, write_stopped
from sae_sweep.train.schedule import lr_multiplier, sparsity_coefficient

log = logging.getLogger("sae_sweep")

OnLog = Callable[[dict[str, float]], None]
# A run whose mean L0 stays below this after the sparsity warm-up has collapsed (< 1 firing per 100 tokens).
COLLAPSED_L0 = 0.01


def check_config(cfg: Config | DictConfig) -> None:
    """Everything a run's config must pass before any work: its values (config.validate) and, with
    eval.lm enabled, a language model and text that resolve (without loading the model)."""
    validate(cfg)
    if cfg.eval.lm.enabled:
        check_lm_eval(cfg.eval.lm, cfg.data.path if cfg.data.kind == "shards" else None)


class Trainer:
    """One training run: model, optimizer, state, run directory. `train(cfg)` trains one; `train_pack`
    (pack.py) steps several on the same batches. The loop that feeds them batches is loop.run_pack."""

    def __init__(self, cfg: Config | DictConfig, on_log: OnLog | None = None):
        self.on_log = on_log
        self.cfg = as_dictconfig(cfg)
        check_config(self.cfg)
        self.run_dir = Path(self.cfg.out_dir)
        self.device = resolve_device(self.cfg.device)
        self.cfg_dict: dict[str, Any] = OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[assignment]

    def previous_outcome(self) -> Metrics | None:
        """The metrics of a run already finished in run_dir (None if there is none to reuse); raises
        RunStopped for a run that stopped early, ConfigError for a different run in the directory."""
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.check_same_run(run_dir, self.cfg_dict)
        finished = rundir.read_metrics(run_dir)
        if finished is not None and not (run_dir / rundir.CHECKPOINT).is_file():
            if finished.get("status") == "completed":
                log.info("run in %s already finished; nothing to do", run_dir)
                return cast(Metrics, finished)
            if finished.get("status") in ("diverged", "collapsed", "pruned"):
                raise RunStopped(
                    finished["status"], finished.get("reason", "") + f" (earlier run in {run_dir})"
                )
        rundir.write_config(run_dir / rundir.CONFIG, self.cfg)
        return None

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, shared: SharedData | None = None) -> None:
        """Open the data (or use a pack's), size the run, build the model, resume or start fresh."""
        cfg = self.cfg
        self.shared = shared if shared is not None else SharedData(cfg.data, cfg.train.progress)
        self.data = self.shared.dataset
        self._plan()
        self._build()
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

    def _plan(self) -> None:
        """The recipe's width, coefficient and lr, checked against the data; the step budget."""
        cfg = self.cfg
        d_in = self.data.d_in
        self.arch = architecture(cfg.model.name)
        n_train = self.data.n_train_tokens
        batch_size = resolve_batch_size(cfg, n_train)
        assert batch_size is not None  # known once the train split's size is
        self.batch_size = batch_size
        if batch_size > n_train:
            given = "" if cfg.batch_size is not None else " (the recipe's, for batch_size=null)"
            raise ConfigError(
                "batch_size", f"{batch_size}{given}", f"at most the {n_train} tokens of the train split"
            )
        if cfg.tokens is not None:
            budget = cfg.tokens
        else:
            epochs = cfg.epochs if cfg.epochs is not None else cfg.data.default_epochs
            budget = math.ceil(epochs * n_train)
        self.total_steps = max(1, math.ceil(budget / batch_size))
        self.hidden, coef, self.lr = resolve_recipe(
            cfg.model.name,
            d_in,
            cfg.hidden_dim,
            cfg.l1_lambda,
            cfg.lr,
            steps=self.total_steps,
            k=cfg.model.get("k"),
        )
        if cfg.lr is None:
            self.lr *= cfg.lr_scale
        self.l1_lambda = coef or 0.0
        # again with the width resolved (e.g. model.k at most hidden, when hidden_dim was null)
        self.arch.check_config(resolve_model_config(cfg.model), cfg.l1_lambda, self.hidden)
        l1_penalised = self.arch.sparsity_metric == "l1"  # the notes' convention concerns an L1 penalty
        if l1_penalised and (note := l1_lambda_note(self.l1_lambda, d_in, batch_size)):
            log.warning("%s", note)
        self.batches_per_epoch = self.data.batches_per_epoch(batch_size)
        self.log_every_steps = max(1, round(cfg.train.log_every_tokens / batch_size))

    def _build(self) -> None:
        cfg = self.cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.sae: SAE = build_sae(cfg.model, self.data.d_in, self.hidden, generator, self.device)
        self.dead = DeadLatentTracker(self.hidden, cfg.train.dead_window, self.device)
        self.state = RunState()
        self.resumed_from_tokens = 0

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
        # fused: one pass over each weight and its moments (the for-loop form makes six; on CPU the step
        # over d_in 768 x hidden 4096 took 22 ms against 4 ms fused)
        return Adam(self.sae.parameters(), lr=self.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)

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
        with torch.no_grad():  # an architecture's hook must not build a graph on the gradients
            self.sae.before_optimizer_step()
        if o.grad_clip > 0:
            clip_gradients(self.sae.parameters(), o.grad_clip)
        self.optimizer.step()
        self.sae.after_optimizer_step(out.fired_H, x_BD.shape[0])
        self.dead.update(out.fired_H, x_BD.shape[0])
        return loss.detach(), out.mse.detach(), out.l0.detach()

    def step(self, x: torch.Tensor, epoch: int, batch_in_epoch: int) -> bool:
        """One optimizer step on a scaled batch already on the device; True when a log row is due."""
        loss, mse, l0 = self._train_step(x, self.state.step)
        return self.record_step(loss, mse, l0, x.shape[0], epoch, batch_in_epoch)

    def record_step(
        self,
        loss: torch.Tensor,
        mse: torch.Tensor,
        l0: torch.Tensor,
        n_tokens: int,
        epoch: int,
        batch_in_epoch: int,
    ) -> bool:
        """Account a step taken (here or by a stack); True when a log row is due."""
        st = self.state
        self.sums += torch.stack((loss, mse, l0))  # stays on the device: no host sync per step
        self.n_in_sums += 1
        st.step += 1
        st.tokens_seen += n_tokens
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
    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics (evaluate_sae) plus the run's loss at its final coefficient."""
        result = evaluate_sae(
            self.sae,
            self.data,
            self.scale_factor,
            batch_size=self.batch_size,
            max_tokens=self.cfg.train.eval_tokens,
            device=self.device,
        )
        metrics: dict[str, Any] = dict(result.metrics)
        self.density, self.latents = result.density, result.latents
        penalised = self.arch.sparsity_metric  # l1, l0; None for the TopK family (loss = mse)
        metrics["loss"] = metrics["mse"] + (self.l1_lambda * metrics[penalised] if penalised else 0.0)
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
                "l1_lambda": self.l1_lambda if self.arch.default_coef is not None else None,
                "k": self.cfg.model.get("k"),
                "lr": self.lr,
                "batch_size": self.batch_size,
                "scale_factor": self.scale_factor,
                "raw_mean_norm": self.raw_mean_norm,
                "status": "completed",
            }
        )
        return metrics

    def finish(self) -> Metrics:
        """Evaluate the finished run, write its outputs, drop its checkpoint; returns its metrics."""
        metrics = self.final_metrics(self.evaluate())
        fvu = metrics.get("fvu")
        if isinstance(fvu, float) and math.isfinite(fvu) and fvu >= COLLAPSED_FVU:
            metrics["status"] = "collapsed"  # it trained to the end but explains nothing: not a result
            metrics["reason"] = (
                f"held-out fvu {fvu:.3g} >= {COLLAPSED_FVU:g}: it reconstructs no better than the mean "
                f"(lr={self.lr:g}; try a lower one)"
            )
        if self.cfg.eval.lm.enabled:
            data_path = self.cfg.data.path if self.cfg.data.kind == "shards" else None
            metrics.update(lm_eval_metrics(self.sae, self.cfg.eval.lm, data_path, self.scale_factor))
        write_finished(self.run_dir, self.sae, self.scale_factor, self.raw_mean_norm, self.state.curves,
                       self.density, self.latents, metrics)  # fmt: skip
        return cast(Metrics, metrics)

    def record_stop(self, err: RunStopped) -> None:
        """A run that stopped early: metrics.json gets its status and reason; no SAE is written."""
        write_stopped(self.run_dir, self.state.curves, err, self.state.tokens_seen)


def train(cfg: Config | DictConfig, on_log: OnLog | None = None) -> Metrics:
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
    run_pack([trainer], outcomes)
    outcome = outcomes[0]
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome.get("status") == "collapsed":  # evaluated, but FVU >= 1
        raise TrainingCollapsed(outcome.get("reason", ""))
    return outcome
