"""train.eval_next_task: each task scored before its training and on the initial model, giving FWT."""

from __future__ import annotations

import pytest
from helpers import run_interrupted_then_resumed, synthetic_text_tasks, tiny_config, tiny_text_stream

from loracl import metrics
from loracl.data.stream import RawTask, build_stream
from loracl.engine import run_experiment
from loracl.errors import ConfigError
from loracl.methods.registry import available_methods, method_class
from loracl.report.render import format_summary_table

TRAIN = {"epochs": 1, "lr": 2e-2, "eval_next_task": True}


def test_domain_incremental_run_fills_the_upper_diagonal_and_fwt(tmp_path):
    stream = tiny_text_stream(3, scenario="domain_incremental", train=12, test=6)
    config = tiny_config(["inc_lora", {"name": "seq_lora", "head": {"type": "prototype"}}], train=TRAIN)
    linear, prototype = run_experiment(config, tmp_path, stream=stream)
    matrix = linear.accuracy_matrix
    assert all(matrix[i][i + 1] is not None for i in range(2)) and matrix[0][2] is None
    before = linear.results["before_training"]
    assert len(before) == 3 and all(value is not None for value in before)  # every task shares task 0's classes
    expected = sum(matrix[j - 1][j] - before[j] for j in (1, 2)) / 2
    assert linear.results["fwt"] == pytest.approx(expected)
    assert linear.results["avg_accuracy"] == pytest.approx(metrics.average_accuracy(matrix))
    # the prototype head has no class means before task 0 ends: no before-training row cells, no FWT
    assert prototype.results["before_training"] == [None, None, None]
    assert prototype.results["fwt"] is None
    assert prototype.accuracy_matrix[0][1] is not None
    report = (tmp_path / "report.md").read_text()
    assert "| FWT |" in report and "| before training |" in report


def test_reused_classes_introduced_after_task_zero_get_both_cells():
    """sentiment-like A, then B with new names, then C reusing B's names: b and a[j-1][j] exist for C only."""
    raw = synthetic_text_tasks(3, train=12, test=6)
    raw[1] = RawTask(raw[1].name, ["x0", "x1"], [(x, "x" + y[1]) for x, y in raw[1].train], [(x, "x" + y[1]) for x, y in raw[1].test])
    raw[2] = RawTask(raw[2].name, ["x0", "x1"], [(x, "x" + y[1]) for x, y in raw[2].train], [(x, "x" + y[1]) for x, y in raw[2].test])
    stream = build_stream(raw, scenario="class_incremental", label_space="by_name")
    [result] = run_experiment(tiny_config("inc_lora", train=TRAIN), None, stream=stream)
    before, matrix = result.results["before_training"], result.accuracy_matrix
    assert before[0] is not None and before[1] is None and before[2] is not None
    assert matrix[0][1] is None and matrix[1][2] is not None
    assert result.results["fwt"] == pytest.approx(matrix[1][2] - before[2])


def test_resume_keeps_the_before_training_row(tmp_path, monkeypatch):
    stream = tiny_text_stream(3, scenario="domain_incremental", train=12, test=6)
    config = tiny_config("inc_lora", train=TRAIN)
    [uninterrupted] = run_experiment(config, tmp_path / "a", stream=stream)
    resumed = run_interrupted_then_resumed(config, tmp_path / "b", stream, monkeypatch)
    assert resumed.accuracy_matrix == uninterrupted.accuracy_matrix
    assert resumed.results["fwt"] == uninterrupted.results["fwt"]


def test_without_the_switch_the_upper_cells_stay_empty():
    stream = tiny_text_stream(2, scenario="domain_incremental", train=8, test=4)
    [result] = run_experiment(tiny_config("inc_lora"), None, stream=stream)
    assert result.accuracy_matrix[0][1] is None and result.results["fwt"] is None
    assert "before_training" not in result.results
    assert "FWT" not in format_summary_table([result.results])


@pytest.mark.parametrize(
    ("method", "scenario", "culprit"),
    [
        ("inc_lora", "class_incremental", "no task of this stream"),
        ({"name": "metalora", "cp_rank": 2}, "domain_incremental", "metalora"),
        ({"name": "lorac_ipc", "rank": 2}, "domain_incremental", "lorac_ipc"),
        ("joint", "domain_incremental", "method `joint` trains on every task at once"),
    ],
)
def test_streams_and_methods_that_cannot_score_unseen_tasks_are_refused(tmp_path, method, scenario, culprit):
    stream = tiny_text_stream(2, scenario=scenario, train=6, test=4)
    with pytest.raises(ConfigError, match=f"train.eval_next_task.*{culprit}"):
        run_experiment(tiny_config(method, train=TRAIN), tmp_path, stream=stream)
    assert not any(tmp_path.rglob("results.json"))


QUICK_FUSION = {"warm_start_steps": 2, "meta_steps": 1, "batch_size": 2, "meta_batch_size": 2, "inner_steps": 1, "latent_dim": 4, "channel_divisor": 8}
SMALL = {
    "fm_lora": {"rank": 4},
    "icm_fusion": {"rank": 2, "mode": "online", "harvest_checkpoints": 2, "support_per_task": 4, "fusion": QUICK_FUSION},
    "oa_adapter": {"rank": 4},
}


@pytest.mark.parametrize(
    "name",
    [
        name
        for name in available_methods()
        if method_class(name).scores_unseen_tasks and not method_class(name).trains_jointly and "classifier" in method_class(name).task_models
    ],
)
def test_every_method_that_claims_it_scores_the_next_task(tmp_path, name):
    stream = tiny_text_stream(2, scenario="domain_incremental", train=6, test=4)
    [result] = run_experiment(tiny_config({"name": name, **SMALL.get(name, {})}, train=TRAIN), tmp_path, stream=stream)
    matrix, before = result.accuracy_matrix, result.results["before_training"]
    # every cell is a count of right answers over the 4 test examples
    assert all(value * 4 == pytest.approx(round(value * 4)) for value in (matrix[0][1], before[0], before[1]))
    # FWT by its definition on two tasks: task 1 scored after training task 0, minus task 1 on the initial model
    assert result.results["fwt"] == pytest.approx(matrix[0][1] - before[1])


def test_a_bad_later_entry_stops_the_run_before_any_entry_trains(tmp_path):
    stream = tiny_text_stream(2, scenario="domain_incremental", train=6, test=4)
    config = tiny_config(["inc_lora", {"name": "metalora", "cp_rank": 2}], train=TRAIN)
    with pytest.raises(ConfigError, match="train.eval_next_task: method `metalora`"):
        run_experiment(config, tmp_path, stream=stream)
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob("*.safetensors"))


def test_a_base_session_is_refused_with_next_task_evaluation(tmp_path):
    stream = tiny_text_stream(3, scenario="domain_incremental", train=6, test=4)
    with pytest.raises(ConfigError, match="train.eval_next_task: needs a stream trained task by task without a base session"):
        run_experiment(tiny_config("inc_lora", train={**TRAIN, "base_session_epochs": 1}), tmp_path, stream=stream)
    assert not any(tmp_path.rglob("results.json"))
