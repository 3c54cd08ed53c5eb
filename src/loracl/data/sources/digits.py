"""scikit-learn's digits (8x8 grey images, shipped with the package): tasks of consecutive digit pairs."""

from __future__ import annotations

import numpy as np

from loracl.data.stream import RawTask
from loracl.errors import ConfigError


def load_digits_tasks(classes_per_task: int = 2, test_fraction: float = 0.2, seed: int = 0) -> list[RawTask]:
    """Ten digits split into 10 / classes_per_task tasks; images as float32 [1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits

    if 10 % classes_per_task != 0:
        raise ConfigError(f"stream.classes_per_task: 10 digits do not split into tasks of {classes_per_task}")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8]
    rng = np.random.default_rng(seed)
    raw_tasks = []
    for first in range(0, 10, classes_per_task):
        labels = [str(digit) for digit in range(first, first + classes_per_task)]
        train, test = [], []
        for digit in range(first, first + classes_per_task):
            indices = np.flatnonzero(digits.target == digit)
            indices = indices[rng.permutation(len(indices))]
            n_test = max(1, int(round(len(indices) * test_fraction)))
            test += [(images[i], str(digit)) for i in sorted(indices[:n_test])]
            train += [(images[i], str(digit)) for i in sorted(indices[n_test:])]
        raw_tasks.append(RawTask(f"digits_{'_'.join(labels)}", labels, train, test, origin="sklearn digits"))
    return raw_tasks
