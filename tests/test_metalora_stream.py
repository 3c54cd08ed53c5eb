"""metalora end to end: a tiny 3-task stream through the real engine, and the ResNet conv slots."""

import json

import pytest
import torch
from helpers import accuracy_by_hand, tiny_config, tiny_text_stream

from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig
from loracl.engine import run_experiment
from loracl.methods.base import MethodContext
from loracl.methods.registry import create_method


def test_tiny_text_stream_end_to_end_with_routing_metric(tmp_path):
    stream = tiny_text_stream(3, train=16, test=8)
    config = tiny_config({"name": "metalora", "mapping_width": 8})
    [result] = run_experiment(config, tmp_path, stream=stream)
    matrix = result.accuracy_matrix
    metrics = result.results["method_metrics"]
    method = result.method
    # the routing metric is what routing the test examples' frozen features says, task by task, recomputed here
    # outside the engine's tally; equal test sizes, so the overall accuracy is the mean of the three
    by_hand = {}
    for task in stream.tasks:
        inputs = method.model.collate(task.test, list(range(len(task.test))), task, False)
        with torch.no_grad():
            routes = method.router.route(method.frozen_features(inputs))
        by_hand[task.name] = float((routes == task.index).float().mean())
    assert metrics["routing_accuracy_per_task"] == pytest.approx(by_hand)
    assert metrics["routing_accuracy"] == pytest.approx(sum(by_hand.values()) / 3)
    # the last row is the final model's accuracy, each routed example predicted by its block
    assert len(matrix) == 3 and all(matrix[i][j] is None for i in range(3) for j in range(i + 1, 3))
    assert matrix[-1] == pytest.approx([accuracy_by_hand(method, task) for task in stream.tasks])
    per_task = result.results["trainable_params_per_task"]
    assert per_task[0] == per_task[1] == per_task[2] > 0  # one block + head rows per task
    stored = result.results["stored_bytes_per_task"]
    assert stored[1] == stored[2]  # growth is linear: one frozen block and its routing rows per task
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["method_metrics"] == metrics
    # a second run on the same folder resumes from the checkpoints and reproduces the matrix
    [again] = run_experiment(config, tmp_path, stream=stream)
    assert again.accuracy_matrix == matrix


def test_resnet_block_convolutions_are_the_auto_slots():
    backbone = load_backbone("digits-resnet", seed=0)
    model = ContinualClassifier(backbone)
    context = MethodContext(HeadConfig(), TrainConfig(), seed=0)
    method = create_method("metalora", {"decomposition": "tr", "mapping_width": 8}, context)
    method.attach(model)
    names = list(method.layers)
    assert names and all(".layer." in name and "shortcut" not in name and "embedder" not in name for name in names)
    assert any(method.layers[name].base_layer.stride == (2, 2) for name in names)  # a strided conv is adapted
    pixels = {"pixel_values": torch.randn(3, 1, 8, 8)}
    base = method.frozen_features(pixels)
    from loracl.data.stream import Split, Task

    task = Task("t", 0, [0, 1], Split([], []), Split([], []))
    method.begin_task(task)
    assert torch.equal(method.adapted_features(pixels, "task_0"), base)
