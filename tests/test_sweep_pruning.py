"""The median pruner (sweep/pruning.py) on an in-memory study of completed trials' curves: when it stays
silent, when it stops a trial and why, and that a trial trading one objective for another runs on."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from sae_sweep.sweep.pruning import CURVE_ATTR, MedianPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_of(*curves: list[list[float]], state: TrialState = TrialState.COMPLETE) -> optuna.Study:
    """A study holding one trial per curve ([[tokens, badness per objective...], ...])."""
    n_objectives = len(curves[0][0]) - 1
    study = optuna.create_study(directions=[optuna.study.StudyDirection.MINIMIZE] * n_objectives)
    add(study, *curves, state=state)
    return study


def add(study: optuna.Study, *curves: list[list[float]], state: TrialState = TrialState.COMPLETE) -> None:
    for curve in curves:
        values = [0.0] * (len(curve[0]) - 1) if state == TrialState.COMPLETE else None
        study.add_trial(
            optuna.trial.create_trial(state=state, values=values, system_attrs={CURVE_ATTR: curve})
        )


def flat(*badness: float, rows: int = 5) -> list[list[float]]:
    """A curve with a row every 1000 tokens, the same badness on each."""
    return [[1000.0 * (r + 1), *badness] for r in range(rows)]


def test_no_trial_is_pruned_during_its_warm_up_rows():
    study = study_of(flat(1.0), flat(1.0), flat(1.0))
    pruner = MedianPruner(startup_trials=1, warmup_rows=3)
    assert pruner.check(study, flat(9.0, rows=3)) is None
    assert pruner.check(study, flat(9.0, rows=4)) is not None  # one row past the warm-up it is


def test_no_verdict_before_enough_completed_trials_reached_this_token_count():
    study = study_of(flat(1.0), flat(1.0))
    add(study, flat(1.0), state=TrialState.PRUNED)  # stopped trials are no reference
    pruner = MedianPruner(startup_trials=3, warmup_rows=0)
    assert pruner.check(study, flat(9.0)) is None
    add(study, flat(1.0))
    assert pruner.check(study, flat(9.0)) is not None


def test_a_trial_worse_than_the_median_on_every_objective_is_pruned_saying_why():
    # The peers' rows at or before 2500 tokens (their 2000-token rows) have medians 2.0 and 0.2.
    peers = [[[1000, 0.5, 0.05], [2000, v, v / 10], [3000, 0.1, 0.01]] for v in (1.0, 2.0, 10.0)]
    study = study_of(*peers)
    pruner = MedianPruner(startup_trials=3, warmup_rows=0)
    assert pruner.check(study, [[2500, 3.0, 0.3]]) == (
        "worse than the median of 3 completed trials at 2500 tokens on every objective"
    )
    assert pruner.check(study, [[2500, 2.0, 0.3]]) is None  # as bad as the median is not worse
    assert pruner.check(study, [[2500, 1.5, 0.15]]) is None


def test_a_trial_worse_on_one_objective_but_better_on_another_runs_on():
    study = study_of(flat(1.0, 1.0), flat(2.0, 2.0), flat(3.0, 3.0))
    pruner = MedianPruner(startup_trials=3, warmup_rows=0)
    assert pruner.check(study, flat(9.0, 0.5)) is None  # a Pareto candidate: sparse but less faithful
    assert pruner.check(study, flat(0.5, 9.0)) is None
    assert pruner.check(study, flat(9.0, 9.0)) is not None


def test_completed_trials_that_never_trained_this_far_are_not_counted():
    study = study_of(flat(1.0, rows=2), flat(1.0, rows=2), flat(1.0, rows=5))
    assert MedianPruner(startup_trials=2, warmup_rows=0).check(study, flat(9.0, rows=3)) is None
    reason = MedianPruner(startup_trials=1, warmup_rows=0).check(study, flat(9.0, rows=3))
    assert reason == "worse than the median of 1 completed trials at 3000 tokens on every objective"
    # At their own length they count: all three reached 2000 tokens.
    reason = MedianPruner(startup_trials=3, warmup_rows=0).check(study, flat(9.0, rows=2))
    assert reason == "worse than the median of 3 completed trials at 2000 tokens on every objective"
