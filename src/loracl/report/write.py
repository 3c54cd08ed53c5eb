"""Write and re-render OUT/: results.json (versioned), report.md, accuracy_matrix.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracl.engine.checkpoint import write_json_atomic
from loracl.errors import LoraclError, read_json_file
from loracl.report.plots import plot_accuracy_matrices
from loracl.report.render import render_report_markdown

SUMMARY_SCHEMA_VERSION = 1


def write_run_outputs(results: dict[str, Any], run_dir: Path) -> None:
    """OUT/<run>/results.json (the single-method run contract) and its heat map."""
    write_json_atomic(run_dir / "results.json", results)
    plot_accuracy_matrices([results], run_dir / "accuracy_matrix.png")


def write_summary_outputs(runs: list[dict[str, Any]], out: Path, config: dict[str, Any] | None) -> None:
    """OUT/results.json with every run, OUT/report.md and OUT/accuracy_matrix.png."""
    write_json_atomic(out / "results.json", {"schema_version": SUMMARY_SCHEMA_VERSION, "config": config, "runs": runs})
    rerender(out)


def load_summary(out: str | Path) -> dict[str, Any]:
    """Read OUT/results.json, with a clear error when it is missing or not a loracl summary."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise LoraclError(f"no results.json in {out}: is it the --out of a finished `loracl run`?")
    data = read_json_file(path)
    if not isinstance(data, dict) or "runs" not in data or "schema_version" not in data:
        raise LoraclError(f"{path} is not a loracl run summary (no `runs` / `schema_version`)")
    if not isinstance(data["schema_version"], int) or isinstance(data["schema_version"], bool):
        raise LoraclError(f"{path}: schema_version must be an integer, got {data['schema_version']!r}")
    if data["schema_version"] > SUMMARY_SCHEMA_VERSION:
        raise LoraclError(f"{path} has schema version {data['schema_version']}; this loracl reads up to {SUMMARY_SCHEMA_VERSION}")
    if not isinstance(data["runs"], list):
        raise LoraclError(f"{path}: `runs` must be a list of runs")
    for index, run in enumerate(data["runs"]):
        check_run(run, f"{path} run {index}")
    return data


def check_run(run: Any, where: str) -> None:
    """What the report reads from a run: a label and an accuracy matrix of numbers or nulls."""
    if not isinstance(run, dict):
        raise LoraclError(f"{where} is not an object")
    for key in ("label", "accuracy_matrix"):
        if key not in run:
            raise LoraclError(f"{where} has no `{key}`")
    matrix = run["accuracy_matrix"]
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        raise LoraclError(f"{where}: accuracy_matrix must be a list of rows")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise LoraclError(f"{where}: accuracy_matrix[{i}][{j}] is {value!r}, not a number or null")


def rerender(out: str | Path) -> Path:
    """Rebuild report.md and the plot from OUT/results.json; returns the report path."""
    out = Path(out)
    data = load_summary(out)
    report = out / "report.md"
    temporary = out / ".report.md.tmp"
    temporary.write_text(render_report_markdown(data["runs"], data.get("config")), encoding="utf-8")
    temporary.replace(report)
    plot_accuracy_matrices(data["runs"], out / "accuracy_matrix.png")
    return report
