"""Continual-learning metrics from the accuracy matrix a[i][j] (accuracy on task j after training task i).

Rows i = 0..T-1, columns j = 0..T-1; cells with j > i are None (not yet seen), except a[i][i+1] when the run
scored each task once before training it (train.eval_next_task). With T tasks:

- average accuracy            A_T   = (1/T) * sum_j a[T-1][j]                     (task mean, last row)
- weighted average accuracy   A_T^w = sum_j n_j a[T-1][j] / sum_j n_j               (n_j = task j's test size)
- average incremental acc.    AIA   = (1/T) * sum_i (1/(i+1)) * sum_{j<=i} a[i][j]  (mean over rows of row means)
- forgetting (max-based)      F     = (1/(T-1)) * sum_{j<T-1} max_{i in [j, T-2]} a[i][j] - a[T-1][j]
- backward transfer           BWT   = (1/(T-1)) * sum_{j<T-1} a[T-1][j] - a[j][j]
- forward transfer            FWT   = (1/|J|) * sum_{j in J} a[j-1][j] - b[j]        (J: tasks j >= 1 with both
                                      cells; b = the before-training row, i.e. accuracies of the initial model;
                                      both exist only with train.eval_next_task, for tasks whose classes the
                                      model already knows: domain-incremental streams, shared label names)
Forgetting and BWT are None for T = 1. A matrix with a single row of T cells (joint training) has only the
average accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _last_row(matrix: Matrix) -> list[float]:
    row = matrix[-1]
    if any(value is None for value in row):
        raise ValueError("the last row of the accuracy matrix must be complete")
    return [float(value) for value in row]  # type: ignore[arg-type]


def average_accuracy(matrix: Matrix) -> float:
    """Mean of the last row (task-mean)."""
    row = _last_row(matrix)
    return sum(row) / len(row)


def weighted_average_accuracy(matrix: Matrix, test_sizes: Sequence[int]) -> float:
    """Last row weighted by each task's number of test examples (sample-weighted)."""
    row = _last_row(matrix)
    if len(test_sizes) != len(row):
        raise ValueError(f"{len(test_sizes)} test sizes for {len(row)} tasks")
    return sum(value * size for value, size in zip(row, test_sizes)) / sum(test_sizes)


def _is_square(matrix: Matrix) -> bool:
    return len(matrix) == len(matrix[-1])


def average_incremental_accuracy(matrix: Matrix) -> float:
    """Mean over rows i of the mean of a[i][0..i]; a single-row matrix gives its row mean."""
    if not _is_square(matrix):
        return average_accuracy(matrix)
    row_means = []
    for i, row in enumerate(matrix):
        seen = [float(value) for value in row[: i + 1]]  # type: ignore[arg-type]
        row_means.append(sum(seen) / len(seen))
    return sum(row_means) / len(row_means)


def forgetting(matrix: Matrix) -> float | None:
    """Mean over earlier tasks of (best accuracy before the last task) - (final accuracy)."""
    if not _is_square(matrix) or len(matrix) < 2:
        return None
    last = len(matrix) - 1
    drops = [max(float(matrix[i][j]) for i in range(j, last)) - float(matrix[last][j]) for j in range(last)]  # type: ignore[arg-type]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Matrix) -> float | None:
    """Mean over earlier tasks of (final accuracy) - (accuracy right after learning it)."""
    if not _is_square(matrix) or len(matrix) < 2:
        return None
    last = len(matrix) - 1
    changes = [float(matrix[last][j]) - float(matrix[j][j]) for j in range(last)]  # type: ignore[arg-type]
    return sum(changes) / len(changes)


def forward_transfer(matrix: Matrix, before_training: Sequence[float | None] | None) -> float | None:
    """Mean over tasks j >= 1 of a[j-1][j] - b[j], over the j where both cells exist (a task whose classes the
    model cannot score before training it has neither); None when no such j exists."""
    if before_training is None or not _is_square(matrix) or len(matrix) < 2:
        return None
    gains = []
    for j in range(1, len(matrix)):
        value, baseline = matrix[j - 1][j], before_training[j]
        if value is not None and baseline is not None:
            gains.append(float(value) - float(baseline))
    return sum(gains) / len(gains) if gains else None


def summarize(matrix: Matrix, test_sizes: Sequence[int], before_training: Sequence[float | None] | None = None) -> dict:
    """All metrics at once, as stored in results.json."""
    return {
        "avg_accuracy": average_accuracy(matrix),
        "avg_accuracy_weighted": weighted_average_accuracy(matrix, test_sizes),
        "avg_incremental_accuracy": average_incremental_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, before_training),
    }
