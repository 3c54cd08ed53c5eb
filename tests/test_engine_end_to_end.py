"""End-to-end runs of tiny streams through the real engine."""

import json

import pytest
import torch
from helpers import accuracy_by_hand, synthetic_text_tasks, tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.data.stream import RawTask, build_stream
from loracl.engine import run_experiment
from loracl.methods.probe import Probe


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
        # every seen cell counts right answers over a task's 12 test examples
        assert all(12 * matrix[i][j] == pytest.approx(round(12 * matrix[i][j])) for i in range(3) for j in range(i + 1))
    # the last row is the final model's accuracy on each task, recomputed outside the engine
    assert matrix[-1] == pytest.approx([accuracy_by_hand(result.method, task) for task in stream.tasks])
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


def test_shared_classes_keep_learning_while_other_old_rows_stay_frozen(tmp_path, monkeypatch):
    """freeze_old freezes earlier tasks' rows, except the rows of classes the new task shares with them."""
    raw = synthetic_text_tasks(3, train=12, test=6)
    raw[1] = RawTask(raw[1].name, ["x0", "x1"], relabel(raw[1].train), relabel(raw[1].test))
    stream = build_stream(raw, scenario="class_incremental", label_space="by_name")  # t2 reuses t0's c0 / c1
    snapshots = []
    original_end = Probe.end_task

    def record(self, task, loader):
        original_end(self, task, loader)
        snapshots.append([weight.detach().clone() for weight in self.model.head.weights])

    monkeypatch.setattr(Probe, "end_task", record)
    run_experiment(tiny_config("probe", train={"lr": 5e-2}), tmp_path, stream=stream)
    after_t0, after_t1, after_t2 = snapshots
    assert torch.equal(after_t1[0], after_t0[0])  # t1 has its own classes: t0's block stays frozen
    assert not torch.equal(after_t2[0], after_t1[0])  # t2 reuses t0's classes: that block learns again
    assert torch.equal(after_t2[1], after_t1[1])  # t1's block is not t2's business


def relabel(pairs):
    """c0 / c1 -> x0 / x1: the same examples under new label names."""
    return [(text, "x" + label[1]) for text, label in pairs]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_within_each_task(tmp_path, monkeypatch, schedule):
    """cosine: step s of a task's S optimizer steps runs at lr (1 + cos(pi s / S)) / 2; constant: lr throughout.
    With lr 0.01 and S = 6: cos(pi s / 6) = 1, sqrt(3)/2, 1/2, 0, -1/2, -sqrt(3)/2, each task starting afresh."""
    import torch

    seen = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = tiny_config("seq_lora", train={"epochs": 2, "batch_size": 8, "lr": 0.01, "lr_schedule": schedule})
    run_experiment(config, tmp_path, stream=tiny_text_stream(2, train=24, test=4))
    # 2 epochs of 24 examples in batches of 8: 6 steps per task
    expected = [0.01, 0.0093301270, 0.0075, 0.005, 0.0025, 0.0006698730] if schedule == "cosine" else [0.01] * 6
    assert seen == pytest.approx(expected * 2, rel=1e-7)
    assert ("lr_schedule" in config.train.fingerprint_dump()) == (schedule == "cosine")
