"""The Pareto front: brute-force checks for two and three objectives, either direction, ties and NaN."""

import numpy as np
import pytest

from sae_sweep.report.pareto import pareto_mask


def brute_force_pareto(l0: list[float], fvu: list[float]) -> list[bool]:
    points = list(zip(l0, fvu, strict=True))

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return [
        not (np.isnan(p[0]) or np.isnan(p[1]))
        and not any(dominates(q, p) for q in points if not (np.isnan(q[0]) or np.isnan(q[1])))
        for p in points
    ]


@pytest.mark.parametrize("seed", range(20))
def test_pareto_mask_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    # Few distinct values, so ties on one or both coordinates are common; some NaN (stopped trials).
    l0 = rng.integers(0, 8, n).astype(float)
    fvu = rng.integers(0, 8, n).astype(float) / 10
    l0[rng.random(n) < 0.1] = np.nan
    fvu[rng.random(n) < 0.1] = np.nan
    assert pareto_mask(np.column_stack([l0, fvu])).tolist() == brute_force_pareto(l0.tolist(), fvu.tolist())


@pytest.mark.parametrize("seed", range(10))
def test_pareto_mask_of_three_objectives_with_directions_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    values = rng.integers(0, 4, (n, 3)).astype(float)  # many ties
    directions = ["minimize", "maximize", "minimize"]
    signed = values * np.array([1, -1, 1])

    def dominates(a, b):
        return all(a <= b) and any(a < b)

    expected = [not any(dominates(signed[j], signed[i]) for j in range(n)) for i in range(n)]
    assert pareto_mask(values, directions).tolist() == expected


def test_identical_looking_trials_are_treated_alike():
    """l1_lambda 0, 1e-9 and 1e-5 of the design card's grid: results equal to the digits shown."""
    values = np.array([[0.41230001, 25.0], [0.41230004, 25.0], [0.4123, 25.00001], [0.5, 30.0]])
    assert pareto_mask(values, ["minimize", "minimize"]).tolist() == [True, True, True, False]
    values[0, 0] = 0.40  # now really better: it alone is on the front
    assert pareto_mask(values, ["minimize", "minimize"]).tolist() == [True, False, False, False]


def test_points_with_nan_are_never_on_the_front_even_when_all_have_one():
    values = np.array([[np.nan, 0.1], [3.0, np.nan], [np.nan, np.nan]])
    assert pareto_mask(values).tolist() == [False, False, False]
    values[2] = [100.0, 100.0]  # the only finite point: on the front however bad
    assert pareto_mask(values).tolist() == [False, False, True]
