"""oa_adapter end to end on tiny streams through the real engine: results, determinism, resume, ViT, ablations."""

import json
import shutil

import pytest
import torch
from helpers import accuracy_by_hand, tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.engine import run_experiment


def test_tiny_text_stream_records_budgets_is_deterministic_and_resumes(tmp_path, caplog):
    stream = tiny_text_stream(3, train=16, test=8)
    config = tiny_config({"name": "oa_adapter", "rank": 4})
    with caplog.at_level("INFO", logger="loracl"):
        [first] = run_experiment(config, tmp_path / "a", stream=stream)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("oa_adapter t")]
    assert [line.split(":")[0] for line in lines] == ["oa_adapter t0", "oa_adapter t1", "oa_adapter t2"]
    assert all(f"of {4 * 4} over 4 sites" in line for line in lines)  # r_max 4 x 4 sites of tiny-bert
    results = first.results
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 3 and all(matrix[i][j] is None for i in range(3) for j in range(i + 1, 3))
    assert matrix[-1] == pytest.approx([accuracy_by_hand(first.method, task) for task in stream.tasks])
    metrics = results["method_metrics"]
    assert list(metrics["r_eff"]) == ["t0", "t1", "t2"]
    # each recorded r_eff is the width the task's branch was pruned to and is served with at that site, and the
    # active parameter count is what those pruned tensors hold (+ one threshold per site)
    layers = first.method.layers
    assert metrics["sites"] == list(layers)
    for index, (task_name, budget) in enumerate(metrics["r_eff"].items()):
        branches = [layers[site].branches[f"task_{index}"] for site in metrics["sites"]]
        assert budget == [branch.gate.shape[0] for branch in branches] == [branch.down.shape[0] for branch in branches]
        held = sum(branch.down.numel() + branch.up.numel() + branch.gate.numel() + 1 for branch in branches)
        assert metrics["active_adapter_params_per_task"][index] == held, task_name
    assert results["per_task"][-1]["method_state"]["r_eff"]["t2"] == dict(zip(metrics["sites"], metrics["r_eff"]["t2"]))
    assert all(active <= metrics["max_adapter_params_per_task"] for active in metrics["active_adapter_params_per_task"])
    saved = json.loads((tmp_path / "a" / "oa_adapter" / "results.json").read_text())
    assert saved["method_metrics"]["r_eff"] == metrics["r_eff"]

    [second] = run_experiment(config, None, stream=stream)  # same seed, no checkpoints
    assert second.results["method_metrics"]["r_eff"] == metrics["r_eff"]
    assert second.results["accuracy_matrix"] == matrix
    first_state, second_state = first.method.state_dict(), second.method.state_dict()
    assert set(first_state) == set(second_state)
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)  # bit-identical tensors

    shutil.rmtree(tmp_path / "a" / "oa_adapter" / "checkpoints" / "task_2")
    [resumed] = run_experiment(config, tmp_path / "a", stream=stream)  # restores pruned task 0 and 1, trains task 2
    assert resumed.results["accuracy_matrix"] == matrix
    assert resumed.results["method_metrics"]["r_eff"] == metrics["r_eff"]


def test_digits_vit_base_session_and_ablation_rows(tmp_path):
    stream = tiny_digits_stream(3, max_train=16, max_test=8)
    entries = [
        {"name": "oa_adapter", "rank": 4},
        {"name": "oa_adapter", "rank": 4, "budget": "fixed", "label": "oa_adapter_fixed_budget"},
    ]
    config = tiny_config(entries, backbone="tiny-vit", train={"base_session_epochs": 1, "epochs": 1})
    results = {result.label: result.results for result in run_experiment(config, tmp_path, stream=stream)}
    assert set(results) == {"oa_adapter", "oa_adapter_fixed_budget"}
    for result in results.values():
        assert list(result["method_metrics"]["r_eff"]) == ["digits_2_3", "digits_4_5"]  # task 0 was the base session
        assert len(result["accuracy_matrix"]) == 3
    fixed = results["oa_adapter_fixed_budget"]["method_metrics"]
    assert all(r == 4 for budget in fixed["r_eff"].values() for r in budget)
