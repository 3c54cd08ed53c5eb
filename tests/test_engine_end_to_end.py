"""End-to-end runs of tiny streams through the real engine."""

import json

import pytest
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
