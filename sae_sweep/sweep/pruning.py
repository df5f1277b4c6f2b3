"""A median pruner that also works for multi-objective studies (Optuna's pruners are single-objective).

Every curves.csv row of a trial is stored on the trial as a curve of objective proxies (lower is better,
see objectives.py). At a row, a trial past its warm-up is pruned when it is worse than the median of the
completed trials at the same token count on *every* objective: with one objective that is Optuna's
MedianPruner; with several, a trial that trades one objective for another (a Pareto candidate) runs on.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

CURVE_ATTR = "sae_sweep:curve"  # trial system attr: [[tokens, badness per objective...], ...]


@dataclass(frozen=True)
class MedianPruner:
    startup_trials: int  # completed trials that must have reached this token count
    warmup_rows: int  # rows a trial trains before it can be pruned

    def check(self, study: optuna.Study, curve: list[list[float]]) -> str | None:
        """Why the trial whose curve this is should stop now, or None."""
        if len(curve) <= self.warmup_rows:
            return None
        tokens, *mine = curve[-1]
        peers = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            other = t.system_attrs.get(CURVE_ATTR)
            if not other or other[-1][0] < tokens:
                continue  # it never trained this far
            at = next((row for row in reversed(other) if row[0] <= tokens), None)
            if at is not None:
                peers.append(at[1:])
        if len(peers) < self.startup_trials:
            return None
        medians = [statistics.median(p[i] for p in peers) for i in range(len(mine))]
        if all(m > med for m, med in zip(mine, medians, strict=True)):
            return (
                f"worse than the median of {len(peers)} completed trials at {int(tokens)} tokens on every "
                "objective"
            )
        return None
