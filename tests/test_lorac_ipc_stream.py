"""lorac_ipc end to end through the real engine: text with and without TII, resume, the ViT with a base session."""

from __future__ import annotations

import pytest
import torch
from helpers import accuracy_by_hand, run_interrupted_then_resumed, tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.engine import run_experiment

KNOBS = {"rank": 4, "ipc_threshold": 0.25, "tap_epochs": 1, "tii_clusters": 2, "tap_centroids": 2}


@torch.no_grad()
def infer_tasks(method, inputs):
    """TII alone: the router's task per example [B] from the routing model's features, and those features."""
    features = method.batch_routing_features({"inputs": inputs})
    return method.router.route(features), features


@torch.no_grad()
def routing_accuracy_by_hand(method, stream):
    """Share of all test examples that TII (the router on the routing model's features) sends to their own task."""
    correct = total = 0
    device = next(method.model.parameters()).device
    for task in stream.tasks:
        inputs = method.model.collate(task.test, list(range(len(task.test))), task, False)
        tasks, _ = infer_tasks(method, {key: value.to(device) for key, value in inputs.items()})
        correct += int((tasks == task.index).sum())
        total += len(tasks)
    return correct / total


def test_text_stream_with_and_without_tii(tmp_path):
    stream = tiny_text_stream(3, train=12, test=6)
    config = tiny_config(
        [{"name": "lorac_ipc", **KNOBS}, {"name": "lorac_ipc", "label": "no_tii", "tii": False, **KNOBS}],
        train={"epochs": 1, "lr": 2e-2},
    )
    with_tii, without_tii = run_experiment(config, tmp_path, stream=stream)
    matrix = with_tii.accuracy_matrix
    assert len(matrix) == 3 and all(matrix[i][j] is None for i in range(3) for j in range(i + 1, 3))
    metrics = with_tii.results["method_metrics"]
    # one routing round per evaluation with more than one task; the last is what TII says on every test example
    # after the final task, recomputed here outside the engine; the last row is the routed predictions' accuracy
    assert len(metrics["tii_accuracy_per_round"]) == 2
    assert metrics["tii_accuracy"] == pytest.approx(routing_accuracy_by_hand(with_tii.method, stream))
    assert metrics["tii_accuracy_per_round"][-1] == round(metrics["tii_accuracy"], 4)
    assert matrix[-1] == pytest.approx([accuracy_by_hand(with_tii.method, task) for task in stream.tasks])
    assert without_tii.accuracy_matrix[-1] == pytest.approx([accuracy_by_hand(without_tii.method, task) for task in stream.tasks])
    assert metrics["frozen_after_each_task"] == [metrics["adapted_slots"] // 4] * 3
    # the shadow w/o-TII scores of the TII run are exactly what the tii: false run measures (same training)
    shadow = metrics["without_tii_accuracy_matrix"]
    assert shadow == [[round(v, 4) if v is not None else None for v in row] for row in without_tii.accuracy_matrix]
    assert "tii_accuracy" in without_tii.results["method_metrics"]
    assert without_tii.results["method_metrics"]["tii_accuracy"] is None
    per_task = with_tii.results["trainable_params_per_task"]
    assert per_task[1] < per_task[0] + 4 * 12  # frozen slots stop training, only old ω's are added
    assert (tmp_path / "lorac_ipc" / "checkpoints" / "task_2").is_dir()


def test_resume_after_interruption_gives_the_same_matrix(tmp_path, monkeypatch):
    stream = tiny_text_stream(3, train=12, test=6)
    config = tiny_config({"name": "lorac_ipc", **KNOBS}, train={"epochs": 1, "lr": 2e-2})
    [uninterrupted] = run_experiment(config, tmp_path / "a", stream=stream)
    resumed = run_interrupted_then_resumed(config, tmp_path / "b", stream, monkeypatch)
    assert resumed.accuracy_matrix == uninterrupted.accuracy_matrix
    assert resumed.results["stored_bytes_cumulative"] == uninterrupted.results["stored_bytes_cumulative"]
    assert resumed.method.extra_state() == uninterrupted.method.extra_state()


def test_vit_with_base_session_routes_over_model_zero(tmp_path):
    stream = tiny_digits_stream(3, max_train=30, max_test=10)
    config = tiny_config(
        {"name": "lorac_ipc", **KNOBS}, backbone="tiny-vit", train={"base_session_epochs": 2, "epochs": 1, "lr": 2e-2}
    )
    [result] = run_experiment(config, tmp_path, stream=stream)
    method = result.method
    assert method.task_model == {0: 0, 1: 1, 2: 2} and method.routing_model == 0
    assert len(result.accuracy_matrix) == 3
    assert method.pool_size == 2  # the base session adds no pair
    assert result.results["method_metrics"]["tii_accuracy"] == pytest.approx(routing_accuracy_by_hand(method, stream))
