"""`loracl report A B ...`: runs of several folders grouped by label, mean ± std over seeds, the spread rule's
verdict against a baseline; bad folders refused in one line (exit 2); one folder re-rendered as before."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loracl.cli import EXIT_BAD_INPUT, main
from loracl.report import format_summary_table, load_summary
from loracl.report.compare import compare_folders, comparison_table, halving_rule, spread_rule

TINY = {
    "seed": 0,
    "backbone": {"name": "tiny-bert"},
    "stream": {"source": "packaged", "max_tasks": 2, "max_train_per_task": 16, "max_test_per_task": 8},
    "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3, "max_length": 32, "progress": False},
    "method": [{"name": "seq_lora"}, {"name": "inc_lora"}],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The tiny config really run by `loracl run` with seeds 0 and 1, one folder each."""
    root = tmp_path_factory.mktemp("runs")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    folders = {}
    for seed in (0, 1):
        folders[seed] = root / f"seed{seed}"
        assert main(["run", str(config), "--out", str(folders[seed]), "--set", f"seed={seed}"]) == 0
    return folders


def fake_folder(base: Path, target: Path, seed: int, accuracy: dict[str, float], **stream: Any) -> Path:
    """A copy of a real run's results.json with the seed, each label's average accuracy and stream keys set."""
    summary = copy.deepcopy(load_summary(base))
    summary["config"]["seed"] = seed
    summary["runs"] = [run for run in summary["runs"] if run["label"] in accuracy]
    for run in summary["runs"]:
        run["seed"] = seed
        run["avg_accuracy"] = accuracy[run["label"]]
        run["stream"].update(stream)
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps(summary))
    return target


def by_label(folders: list[Path], baseline: str | None = None) -> dict[str, list[str]]:
    header, rows = comparison_table(compare_folders(folders, baseline))
    return {row[0]: dict(zip(header, row)) for row in rows}


def listing(runs: dict[int, Path]) -> dict[int, list[tuple[str, int]]]:
    """Every entry of each run folder with its modification time."""
    return {seed: sorted((path.name, path.stat().st_mtime_ns) for path in folder.iterdir()) for seed, folder in runs.items()}


def report(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["report", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_real_runs_of_two_seeds_make_one_table_and_leave_their_folders_alone(runs, tmp_path, capsys):
    before = listing(runs)
    target = tmp_path / "comparison.md"
    code, out, err = report([str(runs[0]), str(runs[1]), "--out-file", str(target)], capsys)
    assert code == 0, err
    accuracy = {seed: {run["label"]: run["avg_accuracy"] for run in load_summary(folder)["runs"]} for seed, folder in runs.items()}
    page = target.read_text()
    for label in ("seq_lora", "inc_lora"):
        values = [accuracy[0][label], accuracy[1][label]]
        mean = sum(values) / 2
        assert f"| {label} | 2 | 0,1 | {mean:.3f} ± " in page
        assert label in out
    assert "| seq_lora | 2 | 0,1 |" in page and "baseline |" in page and "train x seq_lora" in page
    assert listing(runs) == before  # nothing written into the run folders


def test_grouped_mean_and_std_and_a_gap_beyond_the_spread(runs, tmp_path, capsys):
    folders = [
        fake_folder(runs[0], tmp_path / f"s{seed}", seed, {"seq_lora": low, "inc_lora": high})
        for seed, low, high in ((0, 0.5, 0.8), (1, 0.6, 0.9), (2, 0.7, 1.0))
    ]
    rows = by_label(folders)
    assert rows["seq_lora"]["avg acc"] == "0.600 ± 0.100" and rows["seq_lora"]["n"] == "3"
    assert rows["inc_lora"]["avg acc"] == "0.900 ± 0.100" and rows["inc_lora"]["seeds"] == "0,1,2"
    assert rows["seq_lora"]["vs seq_lora"] == "baseline"
    assert rows["inc_lora"]["vs seq_lora"] == "+0.300: beyond the spread"  # 0.3 > 0.1 + 0.1
    code, out, err = report([str(folder) for folder in folders], capsys)
    assert code == 0, err
    assert "+0.300: beyond the spread" in out and "0.900 ± 0.100" in out


def test_a_gap_inside_the_summed_stds_is_within_the_spread(runs, tmp_path):
    folders = [
        fake_folder(runs[0], tmp_path / f"s{seed}", seed, {"seq_lora": low, "inc_lora": high})
        for seed, low, high in ((0, 0.5, 0.55), (1, 0.6, 0.75), (2, 0.7, 0.80))
    ]
    rows = by_label(folders)
    # inc_lora 0.700 ± 0.132, seq_lora 0.600 ± 0.100: a gap of 0.100 inside the summed 0.232
    assert rows["inc_lora"]["vs seq_lora"] == "+0.100: within the spread (±0.232)"
    assert spread_rule([0.5, 0.7], [0.2, 0.4]) == pytest.approx((0.3, "beyond the spread"))
    assert spread_rule([0.5, 0.7], [0.3, 0.5])[1].startswith("within the spread")
    # against another baseline the rule turns round
    assert by_label(folders, "inc_lora")["seq_lora"]["vs inc_lora"] == "-0.100: within the spread (±0.232)"


def test_one_seed_decides_nothing(runs, tmp_path):
    both = fake_folder(runs[0], tmp_path / "a", 0, {"seq_lora": 0.5, "inc_lora": 0.9})
    only_seq = fake_folder(runs[0], tmp_path / "b", 1, {"seq_lora": 0.6})
    rows = by_label([both, only_seq])
    assert rows["inc_lora"]["n"] == "1" and rows["inc_lora"]["avg acc"] == "0.900"
    assert rows["inc_lora"]["vs seq_lora"] == "+0.350: one seed: undecided"


def test_without_seq_lora_no_verdict_and_absolute_speed(runs, tmp_path):
    folders = [fake_folder(runs[0], tmp_path / f"s{seed}", seed, {"inc_lora": 0.5 + seed / 10}) for seed in (0, 1)]
    header, _ = comparison_table(compare_folders(folders))
    assert "train samples/s" in header and not any(name.startswith("vs ") for name in header)


@pytest.mark.parametrize("case", ["missing folder", "no results.json", "malformed results.json", "other tasks", "other scenario"])
def test_bad_folders_are_one_line_naming_the_folder_and_exit_2(case, runs, tmp_path, capsys):
    culprit = tmp_path / "culprit"
    if case == "no results.json":
        culprit.mkdir()
    elif case == "malformed results.json":
        culprit.mkdir()
        (culprit / "results.json").write_text('{"runs": [')
    elif case == "other tasks":
        fake_folder(runs[0], culprit, 1, {"seq_lora": 0.5, "inc_lora": 0.6}, tasks=["cb", "sst2"])
    elif case == "other scenario":
        fake_folder(runs[0], culprit, 1, {"seq_lora": 0.5, "inc_lora": 0.6}, scenario="task_incremental")
    code, out, err = report([str(runs[0]), str(culprit)], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(culprit) in err
    assert out == ""
    if case.startswith("other"):
        assert "cannot be compared" in err


def test_one_label_with_other_settings_is_refused_and_a_repeated_seed_counts_once(runs, tmp_path, capsys):
    other = fake_folder(runs[0], tmp_path / "rank4", 1, {"seq_lora": 0.5})
    summary = json.loads((other / "results.json").read_text())
    summary["runs"][0]["method_options"]["rank"] = 4
    (other / "results.json").write_text(json.dumps(summary))
    code, _, err = report([str(runs[0]), str(other)], capsys)
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1
    assert str(other) in err and "method_options.rank" in err
    again = fake_folder(runs[0], tmp_path / "again", 0, {"seq_lora": 0.9})
    comparison = compare_folders([runs[0], runs[1], again])
    [seq] = [group for group in comparison.groups if group.label == "seq_lora"]
    assert seq.seeds() == [0, 1] and seq.folders == [str(runs[0]), str(runs[1])]
    assert any("seed 0" in note and "counted once" in note for note in comparison.notes)
    code, _, err = report([str(runs[0]), str(runs[0])], capsys)
    assert code == EXIT_BAD_INPUT and "given twice" in err
    code, _, err = report([str(runs[0]), str(runs[1]), "--baseline", "nope"], capsys)
    assert code == EXIT_BAD_INPUT and "--baseline nope" in err and err.count("\n") == 1
    code, out, err = report([str(runs[0]), str(runs[1]), "--out-file", str(tmp_path / "no" / "such.md")], capsys)
    assert code == EXIT_BAD_INPUT and out == "" and err.count("\n") == 1 and "cannot write" in err


def test_one_folder_is_rerendered_as_before(runs, tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "results.json").write_text((runs[0] / "results.json").read_text())
    code, out, err = report([str(folder)], capsys)
    assert code == 0, err
    assert (folder / "report.md").is_file() and (folder / "accuracy_matrix.png").is_file()
    assert out == format_summary_table(load_summary(folder)["runs"]) + f"\n\nreport: {folder / 'report.md'}\n"
    code, _, err = report([str(folder), "--out-file", str(tmp_path / "x.md")], capsys)
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and not (tmp_path / "x.md").exists()


def test_runs_that_differ_only_in_result_neutral_training_keys_are_one_row(runs, tmp_path):
    """train.compile (and progress) are not in a run's fingerprint, so seeds run with and without compiling are
    seeds of one row."""
    compiled = fake_folder(runs[0], tmp_path / "compiled", 1, {"seq_lora": 0.7})
    summary = json.loads((compiled / "results.json").read_text())
    summary["config"]["train"].update({"compile": True, "compile_backend": "aot_eager", "progress": True})
    (compiled / "results.json").write_text(json.dumps(summary))
    [seq] = [group for group in compare_folders([runs[0], compiled]).groups if group.label == "seq_lora"]
    assert seq.seeds() == [0, 1]


def test_halving_rule_compares_mean_forgetting_with_half_the_reference_and_needs_two_seeds_each() -> None:
    assert halving_rule([0.02, 0.04], [0.06, 0.08]) == "halved"  # 0.03 <= 0.035
    assert halving_rule([0.04, 0.04], [0.06, 0.08]) == "not halved"  # 0.04 > 0.035
    assert halving_rule([0.0], [0.06, 0.08]) == "one seed: undecided"
    assert halving_rule([0.0, 0.0], [0.2]) == "one seed: undecided"
