"""Accuracy-matrix heat maps with matplotlib's headless backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_accuracy_matrices(runs: list[dict[str, Any]], path: Path) -> None:
    """One heat map per run, side by side; cells not yet evaluated are blank (a[i][i+1] is drawn when the run
    scored each task before training it)."""
    count = len(runs)
    columns = min(count, 3)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.axis("off")
    for axis, run in zip(axes.flat, runs):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in run["accuracy_matrix"]], dtype=float)
        image = axis.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        tasks = run["stream"]["tasks"]
        axis.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        labels = ["joint"] if matrix.shape[0] != len(tasks) else tasks
        axis.set_yticks(range(matrix.shape[0]), labels, fontsize=8)
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
        axis.set_title(f"{run['label']} (avg {run['avg_accuracy']:.3f})", fontsize=9)
        axis.set_xlabel("evaluated on", fontsize=8)
        axis.set_ylabel("after training", fontsize=8)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)
