"""train_pack(cfgs): several runs trained on one pass over shared batches (a sweep's pack of trials).

Each config becomes a Trainer; those already finished (or refused: a different run in the directory,
a bad value) get their outcome at once; the rest open the data once, set up, and go through the batch
loop together (loop.run_pack). Every member ends with exactly what `train(cfg)` would give it; one that a
`release` hook lets go ends Released with its checkpoint written, and gets that result where it resumes.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from sae_sweep.config import Config
from sae_sweep.errors import PackInterrupted, RunStopped, SaeSweepError
from sae_sweep.train.loop import Outcome, PackRelease, SharedData, run_pack, stream_key
from sae_sweep.train.trainer import OnLog, Trainer


def train_pack(
    cfgs: Sequence[Config | DictConfig],
    on_logs: Sequence[OnLog | None] | None = None,
    release: PackRelease | None = None,
) -> list[Outcome]:
    """Train several runs on one pass over shared batches; returns each run's metrics, or the exception
    that stopped it (RunStopped, a SaeSweepError, or another error), in the order of `cfgs`.

    Every config must name the same data, data.shuffle_seed, batch_size and device (stream_key);
    the runs may differ in anything else (architecture, width, l1_lambda, lr, k, seed, budget). Each run
    keeps its own directory, checkpoint, curves and metrics, and gets exactly the result `train(cfg)`
    gives it. Ctrl-C or SIGTERM checkpoints every unfinished run and raises PackInterrupted, which carries
    the outcomes of the runs that had ended. `release` (indices into `cfgs`) may let members go between
    windows: they end Released, checkpointed.
    """
    on_logs = on_logs if on_logs is not None else [None] * len(cfgs)
    outcomes: dict[int, Outcome] = {}
    members = _unfinished(cfgs, on_logs, outcomes)
    if len({stream_key(m.cfg) for m in members.values()}) > 1:
        raise ValueError(
            "train_pack: the configs differ in data, batch_size or device; they cannot share batches"
        )
    if members:
        first = next(iter(members.values()))
        try:
            shared = SharedData(first.cfg.data, first.cfg.train.progress)
        except SaeSweepError as err:  # the data itself: every member fails the same way
            return [outcomes.get(i, err) for i in range(len(cfgs))]
        ready = _set_up(members, shared, outcomes)
        if ready:
            _train_together(ready, outcomes, release)
    return [outcomes[i] for i in range(len(cfgs))]


def _unfinished(
    cfgs: Sequence[Config | DictConfig], on_logs: Sequence[OnLog | None], outcomes: dict[int, Outcome]
) -> dict[int, Trainer]:
    """A Trainer for each config still to train; the others' outcomes (finished, stopped, refused)."""
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
    return members


def _set_up(
    members: dict[int, Trainer], shared: SharedData, outcomes: dict[int, Outcome]
) -> dict[int, Trainer]:
    ready: dict[int, Trainer] = {}
    for i, member in members.items():
        try:
            member.setup(shared)
            ready[i] = member
        except SaeSweepError as err:
            outcomes[i] = err
    return ready


class _Renumbered:
    """A release hook seen by the loop, whose members are numbered from 0, for one in config indices."""

    def __init__(self, hook: PackRelease, order: list[int]) -> None:
        self.hook, self.order = hook, order

    def choose(self, active: list[int]) -> list[int]:
        chosen = set(self.hook.choose([self.order[j] for j in active]))
        return [j for j in active if self.order[j] in chosen]

    def done(self, released: list[int]) -> None:
        self.hook.done([self.order[j] for j in released])


def _train_together(
    ready: dict[int, Trainer], outcomes: dict[int, Outcome], release: PackRelease | None
) -> None:
    order = list(ready)
    sub: dict[int, Outcome] = {}
    try:
        run_pack([ready[i] for i in order], sub, _Renumbered(release, order) if release else None)
    except KeyboardInterrupt:
        outcomes.update({order[j]: outcome for j, outcome in sub.items()})
        raise PackInterrupted(outcomes) from None
    for j, outcome in sub.items():
        outcomes[order[j]] = outcome
