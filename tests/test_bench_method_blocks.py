"""The measured block of a method page is generated from result JSON files, between its markers only, idempotently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import load_script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
ACCURACY = {  # label -> avg accuracy of seeds 0, 1, 2
    "probe": [0.20, 0.21, 0.19],
    "seq_lora": [0.40, 0.42, 0.38],
    "joint": [0.90, 0.91, 0.89],
    "o_lora": [0.45, 0.46, 0.44],
    "lorac_ipc": [0.80, 0.81, 0.79],
    "lorac_ipc-no-ipc": [0.50, 0.51, 0.49],
}


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_under_test")


def fabricate(root: Path) -> tuple[Path, Path, Path]:
    """A tiny experiment file, three seeds of result JSON per measured row, and an empty methods folder."""
    experiments, results, methods = root / "experiments", root / "results", root / "methods"
    experiments.mkdir()
    methods.mkdir()
    rows = [{"label": label, "name": label.split("-")[0], "seeds": [0, 1, 2]} for label in ACCURACY]
    rows[-1]["ablates"] = "lorac_ipc"
    rows.append({"label": "lorac_ipc-no-tii", "name": "lorac_ipc", "options": {"tii": False}, "seeds": [0], "ablates": "lorac_ipc"})
    experiment = {
        "name": "tiny",
        "title": "Tiny stream",
        "base": {"backbone": {"name": "tiny-bert"}, "stream": {"tasks": ["a", "b"]}, "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3}},
        "rows": rows,
    }
    (experiments / "tiny.yaml").write_text(yaml.safe_dump(experiment))
    for label, values in ACCURACY.items():
        for seed, accuracy in enumerate(values):
            record = {
                "label": label, "seed": seed, "avg_accuracy": accuracy, "forgetting": 0.1, "bwt": -0.1,
                "stored_bytes_cumulative": [1e6, 2e6], "train_samples_per_s": 10.0, "eval_samples_per_s": 20.0,
                "accuracy_matrix": [[accuracy, None], [accuracy, accuracy]],
            }
            path = results / "tiny" / label / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    return experiments, results, methods


def test_block_between_the_markers_from_the_json_and_idempotent(bench, tmp_path: Path) -> None:
    experiments, results, methods = fabricate(tmp_path)
    before = "# lorac_ipc\n\n[P] the paper's composition; [D] our switch.\n\n## Measured\n\nIntro.\n\n"
    after = "\n\n## Single-seed history\n\nKept as written: 0.546.\n"
    page = methods / "lorac_ipc.md"
    page.write_text(before + BEGIN + "\nstale hand-typed 0.123\n" + END + after)
    routed = methods / "routed_inference.md"
    routed.write_text(f"# Routed\n\n{BEGIN}\n{END}\n")
    unmarked = methods / "fm_lora.md"
    unmarked.write_text("# fm_lora\n\nno markers here\n")

    written = bench.write_method_blocks(methods, experiments, results)

    assert sorted(written) == sorted([page, routed])
    text = page.read_text()
    assert text.startswith(before + BEGIN + "\n") and text.endswith(END + after)
    block = text[len(before) + len(BEGIN): -len(END + after)]
    assert "stale" not in block
    assert "### Tiny stream (`tiny`)" in block
    for label in ("probe", "seq_lora", "joint", "lorac_ipc", "lorac_ipc-no-ipc"):
        assert f"\n| {label} | 3 | " in block
    assert "| o_lora |" not in block  # another method's row
    assert "| lorac_ipc | 3 | 0.800 ± 0.010 |" in block
    assert "- `lorac_ipc` against `seq_lora`: +0.400 average accuracy (beyond the spread)." in block
    assert ("- `lorac_ipc` minus `lorac_ipc-no-ipc`: +0.300 average accuracy (seeds [0, 1, 2]; beyond the spread);"
            " forgetting +0.000 (within the spread (±0.000)).") in block
    assert "- Not measured yet: `lorac_ipc-no-tii`." in block
    assert "[results/tiny.md](../results/tiny.md)" in block
    assert "No routed rows in the current experiments" in routed.read_text()
    assert unmarked.read_text() == "# fm_lora\n\nno markers here\n"

    pages = {path: path.read_text() for path in methods.iterdir()}
    assert bench.write_method_blocks(methods, experiments, results) == []
    assert {path: path.read_text() for path in methods.iterdir()} == pages


def test_a_reference_row_of_a_pair_belongs_to_the_page_of_the_row_it_is_compared_with(bench) -> None:
    experiment = {
        "pairs": [["metalora_cp-sst2", "lora_r9-sst2"]],
        "rows": [{"label": "lora_r9-sst2", "name": "seq_lora"}, {"label": "metalora_cp-sst2", "name": "metalora"}],
    }
    assert bench.owned_labels("baselines", experiment) == []
    assert bench.owned_labels("metalora", experiment) == ["metalora_cp-sst2"]


def test_which_method_when_reads_the_best_row_against_each_floor_by_the_spread_rule(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = yaml.safe_load((experiments / "tiny.yaml").read_text())
    lines = bench.which_method_when(experiment, bench.load_rows("tiny", results))
    assert lines[1] == "- Best continual row: `lorac_ipc` (0.800 ± 0.010)."
    [floor] = [line for line in lines if line.startswith("- Floor")]
    assert floor == "- Floor `probe`: 0.200 ± 0.010; the best row against it +0.600 (beyond the spread)."


def test_rows_run_on_a_shared_cpu_keep_their_accuracy_and_lose_their_speed(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    for seed in range(3):  # o_lora's runs shared the CPU: four times slower on paper, and flagged
        path = results / "tiny" / "o_lora" / f"seed{seed}.json"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "train_samples_per_s": 2.5, "shared_cpu": True}))
    experiment = yaml.safe_load((experiments / "tiny.yaml").read_text())
    rows = bench.load_rows("tiny", results)
    table = bench.headline_table(experiment, rows, ["seq_lora", "o_lora"])
    assert table[2] == "| seq_lora | 3 | 0.400 ± 0.020 | 0.100 ± 0.000 | -0.100 ± 0.000 | 2.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 |"
    assert table[3] == "| o_lora | 3 | 0.450 ± 0.010 | 0.100 ± 0.000 | -0.100 ± 0.000 | 2.000 ± 0.000 | - | - |"
    experiment["pairs"] = [["o_lora", "seq_lora"], ["lorac_ipc", "seq_lora"]]
    shared, alone = bench.pair_verdicts(experiment, rows)
    assert shared.endswith("; speeds not comparable (measured on a shared CPU).")
    assert alone.endswith("; training 1.00x, generation 1.00x its speed.")


def test_cheapest_to_serve_compares_only_rows_timed_alone(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = yaml.safe_load((experiments / "tiny.yaml").read_text())

    def rewrite_o_lora(**changes: object) -> None:
        for seed, accuracy in enumerate([0.80, 0.79, 0.81]):  # level with lorac_ipc, the best row
            path = results / "tiny" / "o_lora" / f"seed{seed}.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "avg_accuracy": accuracy, "eval_samples_per_s": 40.0, **changes}))

    rewrite_o_lora()
    lines = bench.which_method_when(experiment, bench.load_rows("tiny", results))
    assert "- Cheapest to serve among those: `o_lora` (evaluation 2.00x seq_lora's speed; the slowest, `lorac_ipc`, 1.00x)." in lines
    rewrite_o_lora(shared_cpu=True)  # its speed no longer counts: one timed row is left, nothing to compare
    lines = bench.which_method_when(experiment, bench.load_rows("tiny", results))
    assert any("Not distinguishable from the best" in line for line in lines)
    assert not any("Cheapest to serve" in line for line in lines)


def test_forgetting_line_lists_rows_that_halve_it_and_flags_those_that_trail_in_accuracy(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = yaml.safe_load((experiments / "tiny.yaml").read_text())
    # o_lora forgets half of seq_lora's 0.1, lorac_ipc less but not half; probe learns little (0.20 < seq_lora's 0.40)
    # and forgets nothing, but a floor is never listed; o_lora's accuracy is above seq_lora's
    for label, forgetting in (("o_lora", 0.05), ("lorac_ipc", 0.06), ("probe", 0.0)):
        for seed in range(3):
            path = results / "tiny" / label / f"seed{seed}.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "forgetting": forgetting}))
    lines = bench.which_method_when(experiment, bench.load_rows("tiny", results))
    [line] = [line for line in lines if line.startswith("- Forgetting")]
    assert line == "- Forgetting at most half sequential LoRA's (0.100 ± 0.000; rows with two seeds or more): `o_lora` (0.050 ± 0.000)."
    for seed, accuracy in enumerate([0.30, 0.31, 0.29]):  # o_lora now learns less than seq_lora, beyond the spread
        path = results / "tiny" / "o_lora" / f"seed{seed}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "avg_accuracy": accuracy}))
    lines = bench.which_method_when(experiment, bench.load_rows("tiny", results))
    [line] = [line for line in lines if line.startswith("- Forgetting")]
    assert line.endswith("`o_lora` (0.050 ± 0.000, but accuracy below seq_lora's beyond the spread).")


def test_ablation_line_reports_forgetting_beside_accuracy(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = yaml.safe_load((experiments / "tiny.yaml").read_text())
    for seed, forgetting in enumerate([0.30, 0.31, 0.29]):  # without IPC it forgets more than the full row's 0.1
        path = results / "tiny" / "lorac_ipc-no-ipc" / f"seed{seed}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "forgetting": forgetting}))
    [line] = bench.ablation_verdicts(experiment, bench.load_rows("tiny", results))
    assert line.endswith("; forgetting -0.200 (beyond the spread).")


def test_records_keep_a_methods_scalar_diagnostics_and_the_page_tabulates_them_per_row(bench) -> None:
    results = {"per_task": [{}], "avg_accuracy": 0.5,
               "method_metrics": {"final_orth_overlap_l1": 8.0, "routed": True, "design_log": [1, 2], "ranks": {"q": 4}}}
    assert bench.compact(results)["diagnostics"] == {"final_orth_overlap_l1": 8.0}  # lists, dicts and flags stay out
    assert "diagnostics" not in bench.compact({"per_task": [{}], "method_metrics": {"design_log": []}})
    rows = {"o_lora": [{"seed": 0, "diagnostics": {"final_orth_overlap_l1": 8.0}},
                       {"seed": 1, "diagnostics": {"final_orth_overlap_l1": 10.0}},
                       {"seed": 2}],  # a record written before diagnostics were kept
            "seq_lora": [{"seed": 0}]}
    assert bench.diagnostic_lines(["seq_lora", "o_lora"], rows) == ["| o_lora | 0,1 | final_orth_overlap_l1 | 9.000 ± 1.414 |"]


def test_a_row_is_judged_against_its_matched_floor_over_the_seeds_both_have(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = {**yaml.safe_load((experiments / "tiny.yaml").read_text()),
                  "matched_floors": [["lorac_ipc", "o_lora"], ["o_lora", "seq_lora"], ["lorac_ipc", "not_run"]]}
    (results / "tiny" / "seq_lora" / "seed2.json").unlink()  # the floor lacks seed 2: o_lora's seed 2 leaves too
    lines = bench.matched_floor_verdicts(experiment, bench.load_rows("tiny", results))
    assert lines == [
        "- `lorac_ipc` against its matched floor `o_lora` (seeds [0, 1, 2]): average accuracy +0.350 (beyond the spread);"
        " forgetting +0.000 (within the spread (±0.000)).",
        "- `o_lora` against its matched floor `seq_lora` (seeds [0, 1]): average accuracy +0.045 (beyond the spread);"
        " forgetting +0.000 (within the spread (±0.000)).",
    ]


@pytest.mark.parametrize("entry", [["lorac_ipc"], ["lorac_ipc", "o_lora", "seq_lora"], "lorac_ipc", ["lorac_ipc", "typo"]])
def test_a_matched_floor_that_is_not_a_pair_of_row_labels_is_refused_naming_it(bench, tmp_path: Path, entry) -> None:
    experiments, _, _ = fabricate(tmp_path)
    path = experiments / "tiny.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "matched_floors": [entry]}))
    with pytest.raises(SystemExit, match="matched_floors entry") as refused:
        bench.load_experiment(str(path))
    assert repr(entry) in str(refused.value)


def test_a_method_page_shows_its_matched_floor_row_and_verdict(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = {**yaml.safe_load((experiments / "tiny.yaml").read_text()), "matched_floors": [["lorac_ipc", "o_lora"]]}
    block = "\n".join(bench.experiment_block("lorac_ipc", experiment, bench.load_rows("tiny", results)))
    assert "\n| o_lora | 3 | 0.450 ± 0.010 |" in block  # shown beside, though another method's row
    assert "- `lorac_ipc` against its matched floor `o_lora` (seeds [0, 1, 2]): average accuracy +0.350 (beyond the spread)" in block
    other = "\n".join(bench.experiment_block("oa_adapter", {**experiment, "rows": [*experiment["rows"], {"label": "oa", "name": "oa_adapter"}]},
                                             bench.load_rows("tiny", results)))
    assert "matched floor" not in other


def test_the_readme_headline_shows_the_best_row_and_leaves_out_a_lever_experiment(bench, tmp_path: Path) -> None:
    experiments, results, _ = fabricate(tmp_path)
    experiment = yaml.safe_load((experiments / "tiny.yaml").read_text())
    rows = bench.load_rows("tiny", results)
    lines = bench.readme_lines(experiment, rows)
    assert lines[0] == "**Tiny stream**"
    assert [line.split(" | ")[0] for line in lines if line.startswith("| ") and " | " in line][1:] == ["| probe", "| seq_lora", "| joint", "| lorac_ipc"]
    assert bench.readme_lines({**experiment, "readme": False}, rows) == []
