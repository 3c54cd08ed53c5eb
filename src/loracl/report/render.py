"""Text renderings of results: the terminal summary table and report.md."""

from __future__ import annotations

from typing import Any


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _human_count(value: int | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _human_bytes(value: int | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _has_fwt(runs: list[dict[str, Any]]) -> bool:
    return any(run.get("fwt") is not None for run in runs)


def summary_header(runs: list[dict[str, Any]]) -> list[str]:
    """SUMMARY_HEADER, with an FWT column after BWT when some run measured it (train.eval_next_task)."""
    if not _has_fwt(runs):
        return list(SUMMARY_HEADER)
    position = SUMMARY_HEADER.index("BWT") + 1
    return [*SUMMARY_HEADER[:position], "FWT", *SUMMARY_HEADER[position:]]


def summary_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One row per run: label, accuracies, forgetting, BWT (FWT), parameters per task, stored size, speed."""
    rows = []
    with_fwt = _has_fwt(runs)
    for run in runs:
        params = run.get("trainable_params_per_task") or []
        rows.append(
            [
                run["label"],
                _number(run.get("avg_accuracy")),
                _number(run.get("avg_accuracy_weighted")),
                _number(run.get("avg_incremental_accuracy")),
                _number(run.get("forgetting")),
                _number(run.get("bwt")),
                *([_number(run.get("fwt"))] if with_fwt else []),
                "/".join(_human_count(p) for p in params) if params else "—",
                _human_bytes((run.get("stored_bytes_cumulative") or [None])[-1]),
                _number(run.get("train_samples_per_s"), 1),
                _number(run.get("eval_samples_per_s"), 1),
                _number(run.get("wall_s"), 0),
            ]
        )
    return rows


SUMMARY_HEADER = [
    "method",
    "avg acc",
    "avg acc (weighted)",
    "avg incr. acc",
    "forgetting",
    "BWT",
    "trainable params / task",
    "stored",
    "train samples/s",
    "eval samples/s",
    "wall s",
]


def _plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def matrix_rows(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one run's accuracy matrix (rows: after training task i)."""
    tasks = run["stream"]["tasks"]
    matrix = run["accuracy_matrix"]
    row_names = ["all tasks (joint)"] if len(matrix) != len(tasks) else [f"after {name}" for name in tasks]
    rows = [[row_names[i]] + [_number(value) for value in row] for i, row in enumerate(matrix)]
    if run.get("before_training") is not None:  # train.eval_next_task: the initial model's scores (FWT's b)
        rows.insert(0, ["before training"] + [_number(value) for value in run["before_training"]])
    return ["", *tasks], rows


def format_summary_table(runs: list[dict[str, Any]], with_matrices: bool = True) -> str:
    """The table `loracl run` prints at the end."""
    parts = []
    if with_matrices:
        for run in runs:
            header, rows = matrix_rows(run)
            parts.append(f"accuracy matrix: {run['label']}\n{_plain_table(header, rows)}\n")
    parts.append(_plain_table(summary_header(runs), summary_rows(runs)))
    return "\n".join(parts)


def render_report_markdown(runs: list[dict[str, Any]], config: dict[str, Any] | None = None) -> str:
    """report.md: the summary table, each accuracy matrix, and how the run was configured."""
    first = runs[0]
    stream = first["stream"]
    lines = [
        "# loracl report",
        "",
        f"Stream: {stream.get('description', '')}, {stream['scenario']}, tasks {', '.join(stream['tasks'])} "
        f"(train sizes {stream['train_sizes']}, test sizes {stream['test_sizes']}). "
        f"Backbone: {first['backbone']['name']}. Seed: {first['seed']}.",
        "",
        "## Summary",
        "",
        "Average accuracy is the mean of the last row of the accuracy matrix; forgetting is the mean drop from "
        "each earlier task's best accuracy to its final one; BWT the mean change from just-learned to final; "
        "FWT (when measured) the mean of a task's accuracy just before its training minus the initial model's.",
        "",
        markdown_table(summary_header(runs), summary_rows(runs)),
        "",
        "![accuracy matrices](accuracy_matrix.png)",
        "",
        "## Accuracy matrices",
        "",
    ]
    for run in runs:
        header, rows = matrix_rows(run)
        lines += [f"### {run['label']}", "", markdown_table(header, rows), ""]
        if run.get("method_metrics"):
            lines += [f"Method metrics: `{run['method_metrics']}`", ""]
    if config is not None:
        import yaml

        lines += ["## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
