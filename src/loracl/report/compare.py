"""Several run folders in one table: runs grouped by label, mean ± std over seeds, a verdict by the spread rule.

The rule is the benchmarks' (benchmarks/bench.py imports it from here): a difference of mean average accuracy
counts only when it exceeds the sum of the two standard deviations; one seed on either side decides nothing."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracl.engine.checkpoint import RESULT_NEUTRAL_TRAIN_KEYS
from loracl.errors import LoraclError
from loracl.report.render import _human_bytes, _plain_table, markdown_table
from loracl.report.write import load_summary

DEFAULT_BASELINE = "seq_lora"
# what must match between two runs put in one table (their streams) and between two runs put in one row
STREAM_KEYS = ("tasks", "scenario", "train_sizes", "test_sizes")
ROW_KEYS = ("method", "method_options", "head", "backbone")


def mean_std(values: Iterable[float | None]) -> str:
    """`mean ± std` with three decimals, one value as itself, "-" for none (None values are left out)."""
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def spread_rule(first: Sequence[float], second: Sequence[float]) -> tuple[float, str]:
    """Difference of means and the verdict: a difference only when it exceeds the sum of the two standard
    deviations (one-sigma bands that do not overlap); one seed on either side decides nothing."""
    delta = statistics.mean(first) - statistics.mean(second)
    if len(first) < 2 or len(second) < 2:
        return delta, "one seed: undecided"
    spread = statistics.stdev(first) + statistics.stdev(second)
    return delta, ("beyond the spread" if abs(delta) > spread else f"within the spread (±{spread:.3f})")


def halving_rule(forgetting: Sequence[float], reference: Sequence[float]) -> str:
    """Whether the mean forgetting is at most half the reference's (the instruction-tuning target); like
    `spread_rule`, one seed on either side decides nothing."""
    if len(forgetting) < 2 or len(reference) < 2:
        return "one seed: undecided"
    return "halved" if statistics.mean(forgetting) <= 0.5 * statistics.mean(reference) else "not halved"


@dataclass
class RunGroup:
    """The runs of one label across folders, one per seed, each with the folder it came from."""

    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        """The runs' numbers under `key`, nulls left out."""
        return [run[key] for run in self.runs if run.get(key) is not None]

    def seeds(self) -> list[Any]:
        """The runs' seeds, in folder order."""
        return [run.get("seed") for run in self.runs]


@dataclass
class Comparison:
    """Grouped runs of several folders, their common stream, the baseline label (None when absent), notes."""

    folders: list[str]
    stream: dict[str, Any]
    groups: list[RunGroup]
    baseline: str | None
    notes: list[str] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(run: dict[str, Any], where: str) -> None:
    """The fields the comparison averages are numbers (avg_accuracy) or numbers / null (the others)."""
    if not _is_number(run.get("avg_accuracy")):
        raise LoraclError(f"{where}: avg_accuracy is {run.get('avg_accuracy')!r}, not a number")
    for key in ("forgetting", "bwt", "train_samples_per_s"):
        if run.get(key) is not None and not _is_number(run[key]):
            raise LoraclError(f"{where}: {key} is {run[key]!r}, not a number or null")
    stored = run.get("stored_bytes_cumulative")
    if stored is not None and not (isinstance(stored, list) and all(_is_number(value) for value in stored)):
        raise LoraclError(f"{where}: stored_bytes_cumulative is not a list of numbers")
    stream = run.get("stream")
    if not isinstance(stream, dict) or not isinstance(stream.get("tasks"), list):
        raise LoraclError(f"{where} has no `stream.tasks`: cannot tell which tasks it ran")


def load_run_folders(folders: Sequence[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """Each folder's results.json (the --out of a finished `loracl run`), checked; errors name the folder."""
    loaded: list[tuple[str, dict[str, Any]]] = []
    seen: dict[Path, str] = {}
    for folder in folders:
        name = str(folder)
        if not Path(folder).is_dir():
            raise LoraclError(f"run folder not found: {name}")
        resolved = Path(folder).resolve()
        if resolved in seen:
            raise LoraclError(f"{name} is given twice (also as {seen[resolved]}): each run folder counts once")
        seen[resolved] = name
        summary = load_summary(folder)
        if not summary["runs"]:
            raise LoraclError(f"{Path(folder) / 'results.json'} holds no runs")
        for index, run in enumerate(summary["runs"]):
            _check_numbers(run, f"{Path(folder) / 'results.json'} run {index}")
        loaded.append((name, summary))
    return loaded


def _first_difference(first: dict[str, Any], second: dict[str, Any], keys: Iterable[str]) -> str | None:
    """The first of `keys` whose values differ, as `key: A vs B` (one level into dicts), or None."""
    for key in keys:
        a, b = first.get(key), second.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = next((k for k in [*a, *b] if a.get(k) != b.get(k)), None)
            if inner is not None:
                return f"{key}.{inner}: {a.get(inner)!r} vs {b.get(inner)!r}"
        return f"{key}: {a!r} vs {b!r}"
    return None


def _row_settings(run: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """What makes two runs the same row but for the seed: method, its options, head, backbone, training."""
    settings = {key: run.get(key) for key in ROW_KEYS}
    train = dict((config or {}).get("train") or {})
    for key in RESULT_NEUTRAL_TRAIN_KEYS:  # as in the checkpoint fingerprint
        train.pop(key, None)
    settings["train"] = train
    return settings


def label_of(run: dict[str, Any]) -> str:
    """A run's row name: its label, else its method's name."""
    return str(run.get("label") or run.get("method"))


def group_runs(loaded: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[RunGroup], list[str]]:
    """Runs grouped by label in order of first appearance, and notes. Refuses runs on another stream than the
    first folder's, and two runs of one label that differ in more than the seed (a row must be one setting)."""
    first_folder, first_summary = loaded[0]
    reference = first_summary["runs"][0]["stream"]
    groups: dict[str, RunGroup] = {}
    settings: dict[str, tuple[str, dict[str, Any]]] = {}
    notes: list[str] = []
    for folder, summary in loaded:
        for run in summary["runs"]:
            difference = _first_difference(reference, run["stream"], STREAM_KEYS)
            if difference is not None:
                raise LoraclError(
                    f"{folder} ran another stream than {first_folder} ({difference}); runs on different streams "
                    "cannot be compared"
                )
            label = label_of(run)
            mine = _row_settings(run, summary.get("config"))
            if label in settings:
                other_folder, theirs = settings[label]
                difference = _first_difference(theirs, mine, [*ROW_KEYS, "train"])
                if difference is not None:
                    raise LoraclError(
                        f"{folder}: `{label}` ran other settings than in {other_folder} ({difference}); give one "
                        "of them its own label to compare them"
                    )
            else:
                settings[label] = (folder, mine)
            group = groups.setdefault(label, RunGroup(label))
            if run.get("seed") is not None and run.get("seed") in group.seeds():
                first = group.folders[group.seeds().index(run.get("seed"))]
                notes.append(f"`{label}` seed {run.get('seed')} is in {first} and {folder}: counted once (from {first}).")
                continue
            group.runs.append(run)
            group.folders.append(folder)
    return list(groups.values()), notes


def compare_folders(folders: Sequence[str | Path], baseline: str | None = None) -> Comparison:
    """Load, check and group the runs of several folders; `baseline` (default seq_lora, if present) is the
    label every row is judged against. A baseline asked for by name must be there."""
    loaded = load_run_folders(folders)
    groups, notes = group_runs(loaded)
    labels = [group.label for group in groups]
    if baseline is not None and baseline not in labels:
        raise LoraclError(f"--baseline {baseline}: no run has that label (labels: {', '.join(labels)})")
    chosen = baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in labels else None)
    stream = loaded[0][1]["runs"][0]["stream"]
    return Comparison([folder for folder, _ in loaded], stream, groups, chosen, notes)


def _cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if digits == 3:
        return mean_std(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _stored(group: RunGroup) -> str:
    """Stored bytes after the last task: the mean, with its std when the seeds differ."""
    values = [run["stored_bytes_cumulative"][-1] for run in group.runs if run.get("stored_bytes_cumulative")]
    if not values:
        return "—"
    text = _human_bytes(round(statistics.mean(values)))
    if len(values) > 1 and statistics.stdev(values) > 0:
        text += f" ± {_human_bytes(round(statistics.stdev(values)))}"
    return text


def verdict(group: RunGroup, reference: RunGroup) -> str:
    """The group's mean average accuracy minus the reference's, with the spread rule's word on it."""
    if group is reference:
        return "baseline"
    delta, word = spread_rule(group.values("avg_accuracy"), reference.values("avg_accuracy"))
    return f"{delta:+.3f}: {word}"


def comparison_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and one row per label: n, seeds, accuracy, forgetting, BWT, stored, speed (and verdict)."""
    groups = {group.label: group for group in comparison.groups}
    reference = groups.get(comparison.baseline) if comparison.baseline else None
    reference_speed = reference.values("train_samples_per_s") if reference else []
    speed_header = f"train x {comparison.baseline}" if reference_speed else "train samples/s"
    header = ["method", "n", "seeds", "avg acc", "forgetting", "BWT", "stored", speed_header]
    if reference is not None:
        header.append(f"vs {comparison.baseline}")
    rows = []
    for group in comparison.groups:
        speeds = group.values("train_samples_per_s")
        if reference_speed:
            speed = _cell([value / statistics.mean(reference_speed) for value in speeds])
        else:
            speed = _cell(speeds, 1)
        row = [
            group.label,
            str(len(group.runs)),
            ",".join(str(seed) for seed in group.seeds()),
            _cell(group.values("avg_accuracy")),
            _cell(group.values("forgetting")),
            _cell(group.values("bwt")),
            _stored(group),
            speed,
        ]
        if reference is not None:
            row.append(verdict(group, reference))
        rows.append(row)
    return header, rows


RULE = (
    "Mean ± standard deviation over the runs of each label (n seeds; one value: one seed, no spread known). A "
    "difference of average accuracy counts only beyond the sum of the two standard deviations; one seed decides "
    "nothing. Stored: bytes kept beyond the frozen backbone after the last task. Speeds compare only runs made on "
    "one machine."
)


def _stream_line(comparison: Comparison) -> str:
    stream = comparison.stream
    return f"Stream: {', '.join(stream['tasks'])} ({stream.get('scenario', '?')}); run folders: {', '.join(comparison.folders)}."


def format_comparison(comparison: Comparison) -> str:
    """The comparison for the terminal: the stream, a plain table and the notes."""
    header, rows = comparison_table(comparison)
    notes = ["", *comparison.notes] if comparison.notes else []
    return "\n".join([_stream_line(comparison), "", _plain_table(header, rows), *notes])


def render_comparison_markdown(comparison: Comparison) -> str:
    """The comparison as a Markdown page: title, stream and folders, how to read it, the table, the notes."""
    header, rows = comparison_table(comparison)
    lines = ["# loracl comparison", "", _stream_line(comparison), "", RULE, "", markdown_table(header, rows), ""]
    if comparison.notes:
        lines += [*(f"- {note}" for note in comparison.notes), ""]
    return "\n".join(lines)


def write_comparison(comparison: Comparison, path: str | Path) -> Path:
    """Write the Markdown comparison to `path` (via a temporary file beside it); returns the path."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(render_comparison_markdown(comparison), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        if temporary.parent.is_dir():
            temporary.unlink(missing_ok=True)
        raise LoraclError(f"cannot write {path}: {exc.strerror}") from None
    return path
