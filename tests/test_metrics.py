"""Metric formulas on hand-checkable matrices."""

import pytest

from loracl import metrics

MATRIX = [
    [0.9, None, None],
    [0.7, 0.8, None],
    [0.6, 0.5, 0.9],
]


def test_average_accuracies():
    assert metrics.average_accuracy(MATRIX) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert metrics.weighted_average_accuracy(MATRIX, [100, 100, 200]) == pytest.approx((60 + 50 + 180) / 400)
    assert metrics.average_incremental_accuracy(MATRIX) == pytest.approx((0.9 + 0.75 + (2.0 / 3)) / 3)


def test_forgetting_is_max_based_and_bwt_uses_the_diagonal():
    assert metrics.forgetting(MATRIX) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert metrics.backward_transfer(MATRIX) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    rising = [[0.5, None], [0.7, 0.9]]
    assert metrics.forgetting(rising) == pytest.approx(-0.2)


def test_forward_transfer_needs_the_before_row_and_cells():
    assert metrics.forward_transfer(MATRIX, [0.1, 0.1, 0.1]) is None  # upper cells not evaluated
    full = [[0.9, 0.4], [0.8, 0.9]]
    assert metrics.forward_transfer(full, [0.5, 0.3]) == pytest.approx(0.1)
    # only tasks with both cells count: task 1 has no before-training score, task 2 does
    partial = [[0.9, 0.2, None], [0.8, 0.9, 0.6], [0.7, 0.8, 0.9]]
    assert metrics.forward_transfer(partial, [0.5, None, 0.4]) == pytest.approx(0.2)
    assert metrics.forward_transfer(partial, [0.5, None, None]) is None


def test_single_row_and_single_task():
    assert metrics.forgetting([[0.5, 0.7]]) is None
    assert metrics.average_accuracy([[0.5, 0.7]]) == pytest.approx(0.6)
    assert metrics.forgetting([[0.8]]) is None
    with pytest.raises(ValueError):
        metrics.average_accuracy([[0.5, None]])
