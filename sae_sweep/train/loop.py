"""The batch loop: one or several runs stepped on one stream of shared batches, and what they share.

`train(cfg)` (trainer.py) runs a single Trainer through it, `train_pack(cfgs)` (pack.py) several that
agree on `stream_key` (data, its order, batch size, device). Here live the data opened once for all of
them (`SharedData`), the Ctrl-C / SIGTERM requests the loop honours between steps (`StopRequests`) and
the loop (`run_pack`), whose steps are: stop if asked, read a window of batches, step every member
through it, account the time, show progress, checkpoint when due.

Members resumed further along wait until the stream reaches them, so each sees exactly the batches it
would alone and ends with the weights `train(cfg)` gives it. Between windows a `PackRelease` hook may let
members go: each is checkpointed and ends with `Released`, to resume elsewhere from that checkpoint
(a sweep's pack shrinking to its worker's share as workers join).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from sae_sweep.checks import resolve_device
from sae_sweep.config import Config, resolve_batch_size
from sae_sweep.data import open_dataset
from sae_sweep.data.device_feed import DeviceFeed
from sae_sweep.errors import Released, RunStopped
from sae_sweep.models.registry import architecture
from sae_sweep.progress import progress_bar
from sae_sweep.rundir import Metrics
from sae_sweep.train.stack import Stack, stack_groups

if TYPE_CHECKING:  # the members' type only: trainer.py imports this module to run them
    from sae_sweep.train.trainer import Trainer

log = logging.getLogger("sae_sweep")

INIT_SAMPLE_TOKENS = 16_384  # enough for the mean b_dec starts at; 200 MB at d_in 3072
Outcome = Metrics | BaseException  # a member's metrics, or why it has none

# A pack steps each member through a window of shared batches before the next member's turn: its weights
# and Adam state stay in cache for the window (on this CPU round-robin stepping of 8 small SAEs lost
# 5-15% to cache misses), while the window's batches are read once for every member.
WINDOW_BYTES = 64 * 2**20
MAX_WINDOW = 8


def as_dictconfig(cfg: Config | DictConfig) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.structured(cfg)


def stream_key(cfg: Config | DictConfig) -> str:
    """What runs must agree on to share batches (train_pack): the data, its order, batch size, device.

    A null batch_size is the recipe's (resolve_batch_size), known from the config alone for a token
    budget; for an epochs budget it depends on the data's size, so the key holds what decides it (the
    architecture's batch rule and the epochs: equal keys still mean equal batch sizes)."""
    cfg = as_dictconfig(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    batch: Any = resolve_batch_size(cfg)
    if batch is None:
        batch = ["recipe", architecture(cfg.model.name).budget_min_steps, cfg.epochs]
    return json.dumps([data, batch, str(resolve_device(cfg.device))], sort_keys=True)


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


def window_size(n_members: int, batch_size: int, d_in: int) -> int:
    """Batches each member steps through before the next member's turn (1 for a single run)."""
    if n_members == 1:
        return 1
    return max(1, min(MAX_WINDOW, WINDOW_BYTES // (4 * batch_size * d_in)))


class PackRelease(Protocol):
    """Asked between windows which members (indices into the pack) to let go."""

    def choose(self, active: list[int]) -> list[int]:
        """Members among `active` to let go now (usually none: called after every window)."""
        ...

    def done(self, released: list[int]) -> None:
        """They are checkpointed and out of the pack."""
        ...


# (epoch, batch in epoch, index counted from the first epoch's first batch, x raw on the device)
SharedBatch = tuple[int, int, int, torch.Tensor]


@dataclass(eq=False)  # compared by identity: the loop follows one stack through its rebuilds
class _Stacked:
    """A stack of the pack and the pack indices of its members (group[j] is stack.members[j])."""

    group: list[int]
    stack: Stack


class _PackLoop:
    """The state of one pass of run_pack; each method is one step of the loop."""

    def __init__(
        self, members: Sequence[Trainer], outcomes: dict[int, Outcome], release: PackRelease | None = None
    ) -> None:
        first = members[0]
        self.release = release
        cfg = first.cfg
        self.members, self.outcomes = members, outcomes
        self.active = dict(enumerate(members))
        self.single = len(members) == 1
        self.per_epoch = first.batches_per_epoch
        start = min(m.next_batch for m in members)
        self.batches = DeviceFeed(
            first.data.train_batches(first.batch_size, start // self.per_epoch, start % self.per_epoch),
            first.device,
        )
        self.window = window_size(len(members), first.batch_size, first.data.d_in)
        # same-shape members stepped as one batched SAE (train.stack; CUDA only by default)
        self.stacks: list[_Stacked] = [
            _Stacked(group, Stack([members[i] for i in group])) for group in stack_groups(members)
        ]
        self.checkpoint_every_s = min(m.cfg.train.checkpoint_every_s for m in members)
        self.last_checkpoint = time.monotonic()
        self.sync = first.device.type == "cuda"
        self.bar = progress_bar(
            total=sum(m.total_steps for m in members),
            initial=sum(m.state.step for m in members),
            enabled=cfg.train.progress,
            unit="step",
            desc=f"{cfg.model.name} h={first.hidden}"
            if self.single
            else f"pack of {len(members)} on shared batches",
            dynamic_ncols=True,
        )

    def run(self) -> None:
        try:
            with StopRequests() as stop:
                while self.active:
                    if stop.requested and self.stop_for_resume(stop.requested):
                        break
                    t0 = time.perf_counter()
                    shared = self.read_window()
                    steps_done, logged, outside = self.step_members(shared, stop)
                    if not stop.requested:
                        self.check_in_step(shared)
                    self.account_time(steps_done, logged, t0, outside)
                    self.show_progress(sum(steps_done.values()))
                    self.checkpoint_if_due()
                    self.release_if_asked()
        finally:
            self.bar.close()
            self.batches.close()

    def end(self, i: int, outcome: Outcome) -> None:
        self.outcomes[i] = outcome
        del self.active[i]

    def checkpoint_all(self) -> None:
        for i, m in list(self.active.items()):
            try:
                m.checkpoint()
            except RunStopped as err:
                m.record_stop(err)
                self.end(i, err)

    def stop_for_resume(self, signal_name: str) -> bool:
        """Checkpoint every member and raise KeyboardInterrupt; True (stop quietly) if none was left."""
        self.checkpoint_all()
        if not self.active:  # every run had ended (e.g. diverged): nothing to resume
            return True
        log.warning(
            "stopped by %s at %s; checkpoint written, re-run the same command to resume",
            signal_name,
            ", ".join(f"{m.state.tokens_seen} tokens" for m in self.active.values()),
        )
        raise KeyboardInterrupt

    def release_if_asked(self) -> None:
        """Let go the members the release hook chooses (never the last one): checkpoint, end Released."""
        if self.release is None or len(self.active) < 2:
            return
        chosen = [i for i in self.release.choose(list(self.active)) if i in self.active]
        let_go = []
        for i in chosen[: len(self.active) - 1]:
            m = self.active[i]
            try:
                m.checkpoint()
            except RunStopped as err:  # diverged since its last row: it ends here, as it would have
                m.record_stop(err)
                self.end(i, err)
                self.unstack(i)
                continue
            self.end(i, Released())
            self.unstack(i)
            let_go.append(i)
        if let_go:
            self.release.done(let_go)

    def unstack(self, i: int) -> None:
        """Member i, if stepped in a stack, leaves it (the stack is rebuilt without it)."""
        for pos, entry in enumerate(self.stacks):
            if i in entry.group:
                j = entry.group.index(i)
                entry.stack.release(j)
                self.restack(pos, [j])
                return

    def read_window(self) -> list[SharedBatch]:
        shared = []
        for _ in range(self.window):
            epoch, batch_in_epoch, x_dev = next(self.batches)
            shared.append((epoch, batch_in_epoch, epoch * self.per_epoch + batch_in_epoch, x_dev))
        return shared

    def step_members(
        self, shared: list[SharedBatch], stop: StopRequests
    ) -> tuple[dict[int, int], bool, float]:
        """Each active member steps through the window's batches it is due for. Returns the steps each
        took, whether any logged a row (on CUDA the host then waited for the device) and the seconds
        spent finishing runs (evaluation and outputs: not training time)."""
        scaled: dict[tuple[float, int], torch.Tensor] = {}  # one product per scale factor
        steps_done: dict[int, int] = {}
        logged = False
        outside = 0.0
        # Each stack by identity: one that ends mid-window leaves the list, and a later stack must not
        # then skip the rest of the window (it would fall behind the stream, never to step again).
        for entry in list(self.stacks):
            for epoch, batch_in_epoch, index, x_dev in shared:
                if entry not in self.stacks or stop.requested:
                    break
                if entry.stack.members[0].next_batch == index:
                    pos = self.stacks.index(entry)
                    did_log, finishing = self.step_stack(pos, x_dev, epoch, batch_in_epoch, steps_done)
                    logged, outside = logged or did_log, outside + finishing
        stacked = {i for entry in self.stacks for i in entry.group}
        for i, m in list(self.active.items()):
            if i in stacked:
                continue
            for epoch, batch_in_epoch, index, x_dev in shared:
                if i not in self.active or stop.requested:
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
                            self.end(i, m.finish())
                            outside += time.perf_counter() - t_finish
                except RunStopped as err:
                    m.record_stop(err)
                    self.end(i, err)
                except Exception as err:  # a bug in one member's model must not end the others
                    log.exception("run in %s failed", m.run_dir)
                    self.end(i, err)
        return steps_done, logged, outside

    def check_in_step(self, shared: list[SharedBatch]) -> None:
        """Every member still running has stepped through the window: one left behind the stream would
        never step again (the stream only moves on), so that is a bug to report, not a loop to spin."""
        last = shared[-1][2]
        behind = [str(m.run_dir) for m in self.active.values() if m.next_batch <= last]
        if behind:
            raise RuntimeError(f"pack loop: {', '.join(behind)} fell behind the batch stream at batch {last}")

    def step_stack(
        self, pos: int, x_dev: torch.Tensor, epoch: int, batch_in_epoch: int, steps_done: dict[int, int]
    ) -> tuple[bool, float]:
        """One step of stack `pos` on a raw batch, then each member's bookkeeping; members that end
        leave the stack. Returns whether any logged a row and the seconds spent finishing runs."""
        group, stack = self.stacks[pos].group, self.stacks[pos].stack
        n = x_dev.shape[0]
        try:
            loss, mse, l0, fired = stack.step(x_dev)
        except Exception as err:  # the stack's members share the failure; the rest of the pack goes on
            log.exception("stacked step of %d runs failed", len(group))
            for j in range(len(group)):
                self.end(group[j], err)
            del self.stacks[pos]
            return False, 0.0
        logged, outside, leaving = False, 0.0, []
        for j, (i, m) in enumerate(zip(group, stack.members, strict=True)):
            m.dead.update(fired[j], n)
            steps_done[i] = steps_done.get(i, 0) + 1
            if not m.record_step(loss[j], mse[j], l0[j], n, epoch, batch_in_epoch):
                continue
            logged = True
            try:
                m.end_interval()
            except RunStopped as err:
                stack.release(j)
                m.record_stop(err)
                self.end(i, err)
                leaving.append(j)
                continue
            if m.finished:
                stack.release(j)
                leaving.append(j)
                t_finish = time.perf_counter()
                try:
                    self.end(i, m.finish())
                except Exception as err:
                    log.exception("run in %s failed", m.run_dir)
                    self.end(i, err)
                outside += time.perf_counter() - t_finish
        if leaving:
            self.restack(pos, leaving)
        return logged, outside

    def restack(self, pos: int, leaving: list[int]) -> None:
        """Rebuild stack `pos` without its members `leaving` (already released), in place: the window
        goes on stepping it."""
        entry = self.stacks[pos]
        group, stack = entry.group, entry.stack
        stay = [j for j in range(len(group)) if j not in leaving]
        if len(stay) >= 2:
            entry.group, entry.stack = [group[j] for j in stay], Stack([stack.members[j] for j in stay])
            return
        for j in stay:  # a stack of one is a member stepped alone again
            stack.release(j)
        del self.stacks[pos]

    def account_time(self, steps_done: dict[int, int], logged: bool, t0: float, outside: float) -> None:
        """Split the window's wall-clock time since t0, less `outside`, over the members by their steps."""
        if self.sync and logged:  # a log row synced the host already: settle the rest of the window
            torch.cuda.synchronize()  # so the wall-clock split below is the real one
        elapsed = time.perf_counter() - t0 - outside
        total = sum(steps_done.values())
        for i, n in steps_done.items():
            self.members[i].state.train_seconds += elapsed * n / total

    def show_progress(self, steps: int) -> None:
        self.bar.update(steps)
        first = self.members[0]
        if self.single and first.state.curves:
            self.bar.set_postfix(first.postfix(), refresh=False)
        elif not self.single:
            self.bar.set_postfix(running=len(self.active), refresh=False)

    def checkpoint_if_due(self) -> None:
        if self.active and time.monotonic() - self.last_checkpoint >= self.checkpoint_every_s:
            self.checkpoint_all()
            self.last_checkpoint = time.monotonic()


def run_pack(
    members: Sequence[Trainer], outcomes: dict[int, Outcome], release: PackRelease | None = None
) -> None:
    """Train set-up members (same data, batch size, device) on one stream of batches until each has
    finished or stopped; outcomes[i] gets member i's metrics or exception (Released for one `release`
    let go). Ctrl-C / SIGTERM checkpoints the unfinished members and raises KeyboardInterrupt (outcomes
    then holds those that had ended)."""
    _PackLoop(members, outcomes, release).run()
