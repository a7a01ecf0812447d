"""Pareto fronts, knees and the recommendation: pure functions on small hand-made tables."""
import math

import numpy as np
import pytest

from engine.tune.pareto import extremes, knee_index, knee_scores, pareto_mask, recommend

NAN = math.nan


def test_front_is_the_non_dominated_points():
    # (validity max, l0 min): (0.5, 3) is dominated by (0.9, 2); (0.9, 2) and (1.0, 4) trade off.
    values = np.array([[0.5, 3.0], [0.9, 2.0], [1.0, 4.0], [0.8, 1.0], [0.8, 5.0]])
    assert pareto_mask(values, ["max", "min"]).tolist() == [False, True, True, True, False]


def test_modes_flip_the_front():
    values = np.array([[1.0, 1.0], [2.0, 2.0]])
    assert pareto_mask(values, ["max", "max"]).tolist() == [False, True]
    assert pareto_mask(values, ["min", "min"]).tolist() == [True, False]
    assert pareto_mask(values, ["max", "min"]).tolist() == [True, True]


def test_equal_points_are_all_on_the_front_and_nan_is_worst():
    values = np.array([[1.0, 2.0], [1.0, 2.0], [NAN, 0.0], [0.5, NAN]])
    assert pareto_mask(values, ["max", "min"]).tolist() == [True, True, True, False]
    # (NaN, 0) is the best l0 and nothing beats it there, so it stays; (0.5, NaN) is beaten by (1, 2).


def test_single_objective_front_is_the_best():
    assert pareto_mask(np.array([[3.0], [1.0], [3.0]]), ["max"]).tolist() == [True, False, True]
    assert knee_index(np.array([[3.0], [1.0], [2.0]]), ["min"]) == 1


def test_knee_is_farthest_below_the_line_through_the_extremes():
    # A convex front: flip ratio (max) against features changed (min). Normalised losses: the extremes
    # (1.0, 9) and (0.2, 1) sit at (0, 1) and (1, 0); (0.9, 2) has losses (0.125, 0.125), the knee.
    values = np.array([[1.0, 9.0], [0.95, 5.0], [0.9, 2.0], [0.5, 1.5], [0.2, 1.0]])
    modes = ["max", "min"]
    assert pareto_mask(values, modes).all()
    scores = knee_scores(values, modes)
    assert scores[0] == pytest.approx(0.0) and scores[-1] == pytest.approx(0.0)
    assert scores[2] == pytest.approx((1 - 0.125 - 0.125) / math.sqrt(2))
    assert knee_index(values, modes) == 2


def test_knee_ignores_dominated_points_and_ties_go_to_the_first():
    values = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.9]])  # maximise both: (0.9, 0.9) is the knee
    assert knee_index(values, ["max", "max"]) == 3
    line = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])  # all on the line: every score 0, the first wins
    assert knee_index(line, ["max", "max"]) == 0
    assert knee_index(np.zeros((0, 2)), ["max", "max"]) is None


def test_recommend_with_a_validity_floor():
    # validity (max) against mean l0 (min); the unconstrained knee (0.85, 1.5) is below the floor, so the
    # recommendation is the knee of the three trials at validity >= 0.9: (0.95, 8).
    values = np.array([[1.0, 10.0], [0.95, 8.0], [0.92, 7.0], [0.85, 1.5], [0.8, 1.0]])
    validity = values[:, 0]
    front, knee = recommend(values, ["max", "min"])
    assert front.all() and knee == 3
    front, rec = recommend(values, ["max", "min"], validity, floor=0.9)
    assert front.all() and rec == 1 and validity[rec] >= 0.9
    assert recommend(values, ["max", "min"], validity, floor=1.01)[1] is None


def test_extremes_are_the_best_front_point_per_objective():
    values = np.array([[1.0, 9.0], [0.9, 2.0], [0.2, 1.0], [0.1, 5.0]])
    front = pareto_mask(values, ["max", "min"])
    assert extremes(values, ["max", "min"], front) == [0, 2]


@pytest.mark.parametrize("values, modes, match", [
    (np.zeros((3, 2)), ["max"], r"shape \[n, 1\]"),
    (np.zeros((3, 1)), ["up"], r"'max' or 'min'"),
])
def test_errors(values, modes, match):
    with pytest.raises(ValueError, match=match):
        pareto_mask(values, modes)
