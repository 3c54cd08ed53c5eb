"""End-to-end runs of tiny streams through the real engine."""

import json

import pytest
import torch
from helpers import tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.engine import run_experiment


@pytest.mark.parametrize("method", ["seq_lora", "inc_lora", "joint", "probe"])
def test_tiny_text_stream_runs_and_reports(tmp_path, method):
    stream = tiny_text_stream(3)
    config = tiny_config(method)
    [result] = run_experiment(config, tmp_path, stream=stream)
    matrix = result.accuracy_matrix
    if method == "joint":
        assert len(matrix) == 1 and len(matrix[0]) == 3
        assert result.results["forgetting"] is None
    else:
        assert len(matrix) == 3
        assert all(matrix[i][j] is None for i in range(3) for j in range(i + 1, 3))
        assert all(0.0 <= matrix[i][j] <= 1.0 for i in range(3) for j in range(i + 1))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["accuracy_matrix"] == matrix
    assert (tmp_path / "report.md").is_file() and (tmp_path / "accuracy_matrix.png").is_file()
    assert (tmp_path / method / "checkpoints").is_dir()


def test_digits_vit_with_base_session(tmp_path):
    stream = tiny_digits_stream(3)
    config = tiny_config("inc_lora", backbone="tiny-vit", train={"base_session_epochs": 2, "epochs": 1})
    [result] = run_experiment(config, tmp_path, stream=stream)
    per_task = result.results["per_task"]
    assert per_task[0]["trainable_params"] > per_task[1]["trainable_params"]  # task 0 trained the whole backbone
    assert (tmp_path / "inc_lora" / "checkpoints" / "task_0" / "backbone.safetensors").is_file()


def test_adapter_dropout_is_active_while_training_although_the_backbone_is_in_eval_mode():
    stream = tiny_text_stream(1, train=16, test=4)
    states = []
    for dropout in (0.0, 0.5):
        config = tiny_config({"name": "seq_lora", "dropout": dropout}, train={"deterministic": True})
        [run] = run_experiment(config, None, stream=stream)
        states.append(run.method.state_dict())
    # same seed and data: only the adapters' dropout can make the trained weights differ
    assert any(not torch.equal(states[0][key], states[1][key]) for key in states[0] if "lora_B" in key)


def test_fm_lora_with_the_cosine_head_trains_finite_rows():
    stream = tiny_text_stream(2, train=8, test=4)
    [run] = run_experiment(tiny_config({"name": "fm_lora", "head": {"type": "cosine"}}), None, stream=stream)
    rows = torch.cat(list(run.method.model.head.weights))
    assert torch.isfinite(rows).all() and (rows.norm(dim=1) > 0).all()
    assert len(run.accuracy_matrix) == 2
