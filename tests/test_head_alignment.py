"""head.align: class Gaussians stored per task and the whole head re-trained on pseudo-features of every class."""

from __future__ import annotations

import pytest
import torch
from helpers import run_interrupted_then_resumed, tiny_config, tiny_text_stream

from loracl.backbones.alignment import ClassGaussians, realign_head
from loracl.backbones.heads import LinearHead
from loracl.engine import run_experiment
from loracl.errors import ConfigError


def test_class_gaussians_hold_cluster_means_and_population_stds():
    gaussians = ClassGaussians(hidden=3, centroids=1, ridge=0.0)
    members = torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]])
    gaussians.store(2, members, seed=0)  # class 2 first: rows 0 and 1 exist but stay invalid
    assert gaussians.means.shape == (3, 1, 3) and gaussians.valid.tolist() == [[False], [False], [True]]
    assert torch.allclose(gaussians.means[2, 0], torch.tensor([1.0, 2.0, 4.0]))
    assert torch.allclose(gaussians.stds[2, 0], torch.tensor([1.0, 1.0, 2.0]))  # population std
    gaussians.store(0, members[:1], seed=0)  # one member has no spread: skipped, as LoRAC-IPC's code does
    assert not gaussians.valid[0, 0]


def test_append_keeps_every_task_of_a_returning_class_and_small_classes_fall_back_to_one_gaussian():
    gaussians = ClassGaussians(hidden=2, centroids=4, ridge=0.0)
    gaussians.append(1, torch.tensor([[0.0, 0.0], [2.0, 2.0]]), seed=0)  # 2 members < 4 clusters: one Gaussian
    gaussians.append(1, torch.tensor([[10.0, 10.0], [12.0, 10.0], [10.0, 12.0], [12.0, 12.0], [11.0, 11.0]] * 2), seed=0)
    assert gaussians.row_class.tolist() == [1, 1]
    assert gaussians.valid[0].tolist() == [True, False, False, False]
    assert torch.allclose(gaussians.means[0, 0], torch.tensor([1.0, 1.0])) and torch.allclose(gaussians.stds[0, 0], torch.ones(2))
    assert gaussians.means[1][gaussians.valid[1]].mean(0)[0] > 9  # the later task's row is its own
    keyed = ClassGaussians(hidden=2, centroids=4, ridge=0.0)
    keyed.store(1, torch.tensor([[0.0, 0.0], [2.0, 2.0]]), seed=0)  # keyed rows (TAP) skip singleton clusters
    assert not keyed.valid.any() and keyed.row_class.tolist() == [0, 1]


def test_realign_samples_labels_from_row_classes():
    """Two rows of class 0 (two tasks, far apart) and one of class 1: both class-0 regions are learned as class 0."""
    torch.manual_seed(0)
    gaussians = ClassGaussians(hidden=2, centroids=1)
    for class_id, centre in ((0, (-4.0, 0.0)), (1, (0.0, 4.0)), (0, (4.0, 0.0))):
        gaussians.append(class_id, torch.tensor(centre) + 0.3 * torch.randn(30, 2), seed=0)
    head = LinearHead(2)
    head.add_classes([0, 1], generator=torch.Generator().manual_seed(0))
    realign_head(head, gaussians, epochs=30, lr=0.1, momentum=0.9, batch_size=32, samples_per_cluster=64,
                 iterations_per_epoch=None, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    assert head(points).argmax(1).tolist() == [0, 0, 1]


def test_realign_fixes_a_head_whose_old_rows_lose_and_restores_flags():
    torch.manual_seed(0)
    hidden, classes = 8, 4
    centres = torch.eye(hidden)[:classes] * 4.0
    gaussians = ClassGaussians(hidden, centroids=2)
    for class_id in range(classes):
        gaussians.store(class_id, centres[class_id] + 0.3 * torch.randn(40, hidden), seed=0)
    head = LinearHead(hidden)
    head.add_classes([0, 1], generator=torch.Generator().manual_seed(0))
    head.add_classes([2, 3], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        head.biases[1].fill_(50.0)  # the newest task's rows win everything, as after current-task training
    head.weights[0].requires_grad_(False)
    probe = centres.repeat_interleave(10, 0) + 0.3 * torch.randn(classes * 10, hidden)
    truth = torch.arange(classes).repeat_interleave(10)
    assert (head(probe).argmax(1) == truth).float().mean() <= 0.5
    realign_head(
        head, gaussians, epochs=20, lr=0.05, momentum=0.9, batch_size=64, samples_per_cluster=32,
        iterations_per_epoch=None, generator=torch.Generator().manual_seed(0),
    )
    assert (head(probe).argmax(1) == truth).float().mean() == 1.0
    assert not head.weights[0].requires_grad and head.weights[1].requires_grad


def test_stream_with_alignment_retrains_old_rows_and_resumes(tmp_path, monkeypatch):
    stream = tiny_text_stream(3, train=12, test=6)
    head = {"align": True, "align_epochs": 2, "align_centroids": 2, "align_samples_per_cluster": 8}
    aligned_config = tiny_config("inc_lora", head=head, train={"epochs": 1, "lr": 2e-2})
    plain_config = tiny_config("inc_lora", train={"epochs": 1, "lr": 2e-2})
    [aligned] = run_experiment(aligned_config, tmp_path / "aligned", stream=stream)
    [plain] = run_experiment(plain_config, tmp_path / "plain", stream=stream)
    assert aligned.results["label"] == "inc_lora" and aligned.results["head"]["align"] is True
    gaussians = aligned.method.model.class_gaussians
    assert gaussians is not None and gaussians.valid.shape[0] == aligned.method.model.head.num_classes == 6
    # without alignment the first task's rows are frozen after task 0; with it they are re-trained
    first_rows_plain = plain.method.model.head.weights[0]
    first_rows_aligned = aligned.method.model.head.weights[0]
    assert not torch.equal(first_rows_plain, first_rows_aligned)
    assert aligned.results["stored_bytes_cumulative"][0] > plain.results["stored_bytes_cumulative"][0]
    # the stored Gaussians travel with the checkpoint: a run interrupted before its last task ends the same
    resumed = run_interrupted_then_resumed(aligned_config, tmp_path / "resumed", stream, monkeypatch)
    assert resumed.accuracy_matrix == aligned.accuracy_matrix
    assert torch.equal(resumed.method.model.head.weights[0], first_rows_aligned)


def test_lorac_ipc_refuses_head_align(tmp_path):
    config = tiny_config({"name": "lorac_ipc", "rank": 2}, head={"align": True})
    with pytest.raises(ConfigError, match="head.align"):
        run_experiment(config, tmp_path, stream=tiny_text_stream(2, train=6, test=4))


def test_run_label_names_alignment():
    config = tiny_config({"name": "probe", "head": {"type": "linear", "align": True}})
    assert config.method[0].run_label == "probe+linear+align"
